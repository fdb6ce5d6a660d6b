//! What the kernel holds, as read back with `nft -j list table ip trellis`, reduced to what
//! decides whether it is the table ztunnel wants: the sets and their elements, and each base
//! chain's type, hook, priority, policy and rules (by the tag in their comments, in order).
//! Counters, handles and anything outside the table are left out.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::rules::TABLE;

/// A table's shape, comparable between desired ([`super::rules::Table::snapshot`]) and installed
/// ([`parse`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Set name → elements, as nft prints them.
    pub sets: BTreeMap<String, BTreeSet<String>>,
    /// Chain name → its shape.
    pub chains: BTreeMap<String, ChainShape>,
}

/// One chain of a [`Snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainShape {
    pub kind: String,
    pub hook: String,
    pub priority: i64,
    pub policy: String,
    /// Each rule's comment (empty when it has none), in order.
    pub rules: Vec<String>,
}

/// Reads the output of `nft -j list table ip trellis`.
pub fn parse(json: &str) -> Result<Snapshot, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("nft printed JSON that does not parse: {e}"))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft printed JSON without an \"nftables\" list")?;
    let ours = |o: &Value| {
        o.get("family").and_then(Value::as_str) == Some("ip") && o.get("table").and_then(Value::as_str) == Some(TABLE)
    };
    let text = |o: &Value, key: &str| o.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let mut snapshot = Snapshot::default();
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in items {
        if let Some(set) = item.get("set").filter(|s| ours(s)) {
            let elements = match set.get("elem") {
                None => BTreeSet::new(),
                Some(Value::Array(list)) => list.iter().map(element).collect(),
                Some(one) => BTreeSet::from([element(one)]),
            };
            snapshot.sets.insert(text(set, "name"), elements);
        } else if let Some(chain) = item.get("chain").filter(|c| ours(c)) {
            let shape = ChainShape {
                kind: text(chain, "type"),
                hook: text(chain, "hook"),
                priority: chain.get("prio").and_then(Value::as_i64).unwrap_or_default(),
                policy: text(chain, "policy"),
                rules: Vec::new(),
            };
            snapshot.chains.insert(text(chain, "name"), shape);
        } else if let Some(rule) = item.get("rule").filter(|r| ours(r)) {
            rules
                .entry(text(rule, "chain"))
                .or_default()
                .push(text(rule, "comment"));
        }
    }
    for (chain, list) in rules {
        // A rule of a chain the listing did not show still counts as a difference.
        snapshot.chains.entry(chain).or_default().rules = list;
    }
    Ok(snapshot)
}

/// An element as nft prints it: a plain address, or the JSON of anything fancier (a prefix, a
/// range), which then never equals a desired address.
fn element(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The first way `installed` (`None`: no table at all) falls short of `desired`, for the log.
pub fn difference(desired: &Snapshot, installed: Option<&Snapshot>) -> Option<String> {
    let Some(installed) = installed else {
        return Some(format!("table ip {TABLE} is missing"));
    };
    for (name, want) in &desired.sets {
        match installed.sets.get(name) {
            None => return Some(format!("set {name} is missing")),
            Some(have) if have != want => {
                let missing: Vec<_> = want.difference(have).collect();
                let extra: Vec<_> = have.difference(want).collect();
                return Some(format!("set {name}: missing {missing:?}, extra {extra:?}"));
            }
            Some(_) => {}
        }
    }
    if let Some(name) = installed.sets.keys().find(|n| !desired.sets.contains_key(*n)) {
        return Some(format!("set {name} is not ours"));
    }
    for (name, want) in &desired.chains {
        match installed.chains.get(name) {
            None => return Some(format!("chain {name} is missing")),
            Some(have) if have != want => {
                return Some(format!("chain {name} is {have:?}, not {want:?}"));
            }
            Some(_) => {}
        }
    }
    if let Some(name) = installed.chains.keys().find(|n| !desired.chains.contains_key(*n)) {
        return Some(format!("chain {name} is not ours"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::rules::{desired, Plan, Ports};

    const PORTS: Ports = Ports {
        outbound: 15001,
        inbound_plain: 15006,
        hbone: 15008,
        metrics: 15020,
        readiness: 15021,
    };

    /// What nft 1.0.6 prints for the pod table, built from the desired table's own tags.
    fn listing(elements: &str, rules: &[(&str, String)]) -> String {
        let rules: Vec<String> = rules
            .iter()
            .enumerate()
            .map(|(i, (chain, comment))| {
                format!(
                    r#"{{"rule": {{"family": "ip", "table": "trellis", "chain": "{chain}", "handle": {}, "comment": "{comment}", "expr": [{{"counter": {{"packets": 3, "bytes": 180}}}}]}}}}"#,
                    10 + i
                )
            })
            .collect();
        format!(
            r#"{{"nftables": [
              {{"metainfo": {{"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}}},
              {{"table": {{"family": "ip", "name": "trellis", "handle": 2}}}},
              {{"set": {{"family": "ip", "name": "enrolled", "table": "trellis", "type": "ipv4_addr", "handle": 4{elements}}}}},
              {{"chain": {{"family": "ip", "table": "trellis", "name": "antispoof", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}}}},
              {{"chain": {{"family": "ip", "table": "trellis", "name": "capture", "handle": 2, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}}},
              {{"chain": {{"family": "ip", "table": "trellis", "name": "guard", "handle": 3, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}},
              {}
            ]}}"#,
            rules.join(",\n")
        )
    }

    fn tags(plan: &Plan) -> Vec<(&'static str, String)> {
        let table = desired(plan, PORTS);
        table
            .chains
            .iter()
            .flat_map(|c| c.rules.iter().map(move |r| (c.name, r.tag())))
            .collect()
    }

    #[test]
    fn a_listing_of_the_desired_table_reads_back_equal() {
        let plan = Plan::Pods(["10.1.1.10".parse().unwrap(), "10.1.1.12".parse().unwrap()].into());
        let json = listing(r#", "elem": ["10.1.1.10", "10.1.1.12"]"#, &tags(&plan));
        let installed = parse(&json).unwrap();
        let want = desired(&plan, PORTS).snapshot();
        assert_eq!(difference(&want, Some(&installed)), None);
        assert_eq!(installed, want, "counters and handles do not matter");
    }

    #[test]
    fn a_lone_element_and_an_empty_set_read_back() {
        let one = Plan::Pods(["10.1.1.10".parse().unwrap()].into());
        assert_eq!(
            parse(&listing(r#", "elem": "10.1.1.10""#, &tags(&one))).unwrap(),
            desired(&one, PORTS).snapshot()
        );
        let none = Plan::Pods(BTreeSet::new());
        assert_eq!(
            parse(&listing("", &tags(&none))).unwrap(),
            desired(&none, PORTS).snapshot()
        );
    }

    #[test]
    fn stale_elements_missing_rules_and_foreign_rules_are_differences() {
        let plan = Plan::Pods(["10.1.1.10".parse().unwrap(), "10.1.1.12".parse().unwrap()].into());
        let want = desired(&plan, PORTS).snapshot();
        let all = tags(&plan);

        let stale = parse(&listing(r#", "elem": ["10.1.1.10"]"#, &all)).unwrap();
        let why = difference(&want, Some(&stale)).unwrap();
        assert!(why.contains("enrolled") && why.contains("10.1.1.12"), "{why}");

        let flushed: Vec<_> = all.iter().filter(|(c, _)| *c != "capture").cloned().collect();
        let elems = r#", "elem": ["10.1.1.10", "10.1.1.12"]"#;
        let why = difference(&want, Some(&parse(&listing(elems, &flushed)).unwrap())).unwrap();
        assert!(why.contains("chain capture"), "{why}");

        let mut edited = all.clone();
        edited[1].1 = "outbound:000000000000".into();
        assert!(difference(&want, Some(&parse(&listing(elems, &edited)).unwrap())).is_some());

        let mut foreign = all.clone();
        foreign.push(("guard", String::new()));
        assert!(difference(&want, Some(&parse(&listing(elems, &foreign)).unwrap())).is_some());

        assert_eq!(difference(&want, None).unwrap(), "table ip trellis is missing");
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_table() {
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"something": []}"#).is_err());
    }
}
