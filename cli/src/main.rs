//! `trellis`: the command-line interface of the mesh.
//!
//! Verbs follow DESIGN.md ("What the user does"): `federation`, `namespace`, `waypoint`,
//! `traffic`, `status` and `lab`. The parser is complete; verbs whose machinery has not landed
//! yet say so and exit with status 2, naming what they will do.
//!
//! [`traffic`] shifts a global service's traffic between clusters (etcd's `traffic/`) and shows
//! who serves it.
//!
//! Read [`lab`] (the network-namespace lab) and [`demo`] (the application its pods run).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;
mod federation;
mod identity;
mod lab;
mod status;
mod traffic;

use clap::{Parser, Subcommand};

/// Trellis: a multi-cluster, ambient-style service mesh.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Join this cluster to a federation, leave it, or list its members.
    #[command(subcommand)]
    Federation(Federation),
    /// Label a namespace (e.g. trellis.io/dataplane-mode=ambient to enrol it).
    #[command(subcommand)]
    Namespace(Namespace),
    /// Label a service (e.g. trellis.io/global=true to export it to the federation).
    #[command(subcommand)]
    Service(Service),
    /// Enable or remove the L7 waypoint of a namespace.
    #[command(subcommand)]
    Waypoint(Waypoint),
    /// Shift a global service's traffic between clusters by weight.
    #[command(subcommand)]
    Traffic(Traffic),
    /// Show what is meshed: enrolled namespaces, workloads per node, connected nodes, problems.
    Status {
        /// trellisd's loopback admin address.
        #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        /// Print trellisd's JSON as is.
        #[arg(long)]
        json: bool,
    },
    /// Run Trellis on this machine in network namespaces: nodes, pods, etcd, capture.
    #[command(subcommand)]
    Lab(lab::Lab),
    /// Issue identities offline, for hosts that run ztunnel without a control plane.
    #[command(subcommand)]
    Identity(Identity),
    /// The lab's demo application: `server`, `call`, `client` (see `trellis demo --help`).
    #[command(subcommand, hide = true)]
    Demo(demo::Demo),
}

#[derive(Debug, Subcommand)]
enum Identity {
    /// Sign an SVID (certificate chain and key, one PEM file) with the cluster CA's files, e.g.
    /// `trellis identity issue --ca-dir /var/lib/trellis/ca --id spiffe://east.trellis.local/ns/legacy/sa/billing --out billing.pem`.
    Issue {
        /// Directory with the CA's ca-cert.pem, ca-key.pem and root-cert.pem (trellisd's --ca-dir).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The SPIFFE ID to issue.
        #[arg(long)]
        id: String,
        /// Lifetime in hours (nothing renews an offline SVID).
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// Where to write the PEM file (created with mode 600).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Federation {
    /// Join the federation stored in etcd: writes this cluster's membership into the manifest
    /// directory; trellisd registers the cluster, its trust bundle and gateway, and follows the
    /// others (the membership survives restarts like any manifest).
    Join {
        #[command(flatten)]
        join: federation::Join,
        #[command(flatten)]
        at: Where,
    },
    /// Create a member's etcd user and role (an operator's step before that cluster joins):
    /// it may read the federation and write only its own keys. With root's etcd certificate;
    /// --enable-auth also creates root and turns etcd's authentication on (once per etcd).
    Grant {
        /// The cluster to grant (its etcd user is trellis-cluster-<cluster>: the CN of the
        /// certificate it joins with).
        #[arg(long)]
        cluster: String,
        /// Its trust domain (default <cluster>.trellis.local).
        #[arg(long)]
        trust_domain: Option<String>,
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        #[arg(long)]
        etcd_ca: PathBuf,
        /// root's certificate (CN root).
        #[arg(long)]
        etcd_cert: PathBuf,
        #[arg(long)]
        etcd_key: PathBuf,
        /// Also create root and the operator's user, and enable etcd's authentication.
        #[arg(long)]
        enable_auth: bool,
    },
    /// Leave the federation: trellisd withdraws this cluster's keys.
    Leave {
        #[command(flatten)]
        at: Where,
    },
    /// List federated clusters and their sync state.
    Status {
        /// Wait until every member is synced (up to --wait-seconds), printing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        wait_seconds: u64,
        /// trellisd's loopback admin address.
        #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
    },
}

/// Where this cluster's trellisd is: its manifest directory and its admin endpoint.
#[derive(Debug, clap::Args)]
struct Where {
    /// The manifest directory trellisd discovers from.
    #[arg(long, env = "TRELLIS_MANIFESTS", default_value = "/etc/trellis/manifests")]
    manifests: PathBuf,
    /// trellisd's loopback admin address.
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
}

#[derive(Debug, Subcommand)]
enum Namespace {
    /// Set (or with --remove, delete) a label on a namespace, e.g.
    /// `trellis namespace label shop trellis.io/dataplane-mode=ambient`.
    Label {
        namespace: String,
        /// key=value, or just key with --remove (kubectl's `key-` works too).
        label: String,
        #[arg(long)]
        remove: bool,
        /// The manifest directory trellisd discovers from.
        #[arg(long, env = "TRELLIS_MANIFESTS", default_value = "/etc/trellis/manifests")]
        manifests: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Service {
    /// Set (or with --remove, delete) a label on a service, e.g.
    /// `trellis service label -n shop cart trellis.io/global=true`.
    Label {
        #[arg(short = 'n', long)]
        namespace: String,
        service: String,
        /// key=value, or just key with --remove (kubectl's `key-` works too).
        label: String,
        #[arg(long)]
        remove: bool,
        /// The manifest directory trellisd discovers from.
        #[arg(long, env = "TRELLIS_MANIFESTS", default_value = "/etc/trellis/manifests")]
        manifests: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Waypoint {
    /// Deploy the namespace's waypoint and route its traffic through it.
    Apply {
        #[arg(short = 'n', long)]
        namespace: String,
    },
    /// Remove the namespace's waypoint.
    Delete {
        #[arg(short = 'n', long)]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
enum Traffic {
    /// Set a global service's cluster weights, e.g. `--cluster east=90,west=10`, or `--clear`
    /// them (back to locality): writes etcd's traffic/<ns>/<name> with the operator's etcd
    /// credentials; every cluster's ztunnels then split new connections by the weights.
    Shift {
        #[arg(short = 'n', long)]
        namespace: String,
        service: String,
        /// Relative weights, 0 to 10000 each (90 and 10: 90% and 10% of new connections). A
        /// member with weight 0, or not named, gets connections only when no weighted cluster
        /// has a healthy endpoint; a weighted one without healthy endpoints gives its share to
        /// the others.
        #[arg(
            long,
            value_name = "CLUSTER=WEIGHT,...",
            required_unless_present = "clear",
            conflicts_with = "clear"
        )]
        cluster: Option<String>,
        /// Remove the weights: new connections follow locality again.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        operator: traffic::Operator,
    },
    /// Show a global service's weights, its endpoints per cluster and how many are healthy,
    /// and which clusters serve it now, as this cluster's trellisd sees it.
    Status {
        #[arg(short = 'n', long)]
        namespace: String,
        service: String,
        /// trellisd's loopback admin address.
        #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
    },
}

fn traffic_verb(verb: Traffic) -> ExitCode {
    match verb {
        Traffic::Shift {
            namespace,
            service,
            cluster,
            clear: _,
            operator,
        } => match traffic::shift(&namespace, &service, cluster.as_deref(), &operator) {
            Ok((said, warnings)) => {
                for w in warnings {
                    eprintln!("trellis traffic shift: warning: {w}");
                }
                println!("{said}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trellis traffic shift: {e}");
                ExitCode::FAILURE
            }
        },
        Traffic::Status {
            namespace,
            service,
            admin,
        } => match traffic::status(admin, &namespace, &service) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trellis traffic status: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// What a verb that has not landed yet answers.
fn not_yet(verb: &str, what: &str) -> ExitCode {
    eprintln!("trellis {verb}: not available yet. It will {what}. Nothing was changed.");
    ExitCode::from(2)
}

/// A label argument as kubectl takes it: `key=value` sets, `key-` (or `key` with `--remove`)
/// removes.
fn label_arg(label: &str, remove: bool) -> Option<(&str, Option<&str>)> {
    match (label.split_once('='), label.strip_suffix('-')) {
        (Some((k, v)), _) if !remove => Some((k, Some(v))),
        (None, Some(k)) => Some((k, None)),
        (None, None) if remove => Some((label, None)),
        _ => None,
    }
}

/// `trellis namespace label` and `trellis service label`: edit the manifest source trellisd
/// watches. `object` names what is labelled (`namespace/shop`, `service/shop/cart`).
fn edit_label(
    verb: &str,
    object: &str,
    label: &str,
    remove: bool,
    edit: impl FnOnce(&str, Option<&str>) -> Result<std::path::PathBuf, trellis_mesh::edit::EditError>,
) -> ExitCode {
    let Some((key, value)) = label_arg(label, remove) else {
        eprintln!("trellis {verb}: give key=value to set, or key with --remove (or key-) to remove");
        return ExitCode::from(2);
    };
    match edit(key, value) {
        Ok(path) => {
            match value {
                Some(v) => println!("{object} labelled {key}={v} ({})", path.display()),
                None => println!("{object} unlabelled {key} ({})", path.display()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis {verb}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn federation_verb(verb: Federation) -> ExitCode {
    let (what, outcome) = match verb {
        Federation::Join { join, at } => ("join", federation::join(&at.manifests, at.admin, &join)),
        Federation::Leave { at } => ("leave", federation::leave(&at.manifests, at.admin)),
        Federation::Grant {
            cluster,
            trust_domain,
            etcd,
            etcd_ca,
            etcd_cert,
            etcd_key,
            enable_auth,
        } => {
            let td = trust_domain.unwrap_or_else(|| format!("{cluster}.trellis.local"));
            (
                "grant",
                federation::grant(&cluster, &td, etcd, &etcd_ca, &etcd_cert, &etcd_key, enable_auth),
            )
        }
        Federation::Status {
            wait,
            wait_seconds,
            admin,
        } => (
            "status",
            federation::status(admin, wait.then(|| std::time::Duration::from_secs(wait_seconds))),
        ),
    };
    match outcome {
        Ok(said) => {
            print!(
                "{}",
                if said.ends_with('\n') {
                    said
                } else {
                    format!("{said}\n")
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis federation {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.verb {
        Verb::Federation(verb) => federation_verb(verb),
        Verb::Namespace(Namespace::Label {
            namespace,
            label,
            remove,
            manifests,
        }) => edit_label(
            "namespace label",
            &format!("namespace/{namespace}"),
            &label,
            remove,
            |key, value| trellis_mesh::edit::label_namespace(&manifests, &namespace, key, value),
        ),
        Verb::Service(Service::Label {
            namespace,
            service,
            label: text,
            remove,
            manifests,
        }) => edit_label(
            "service label",
            &format!("service/{namespace}/{service}"),
            &text,
            remove,
            |key, value| trellis_mesh::edit::label_service(&manifests, &namespace, &service, key, value),
        ),
        Verb::Waypoint(Waypoint::Apply { .. }) => not_yet("waypoint apply", "deploy the namespace's L7 waypoint"),
        Verb::Waypoint(Waypoint::Delete { .. }) => not_yet("waypoint delete", "remove the namespace's L7 waypoint"),
        Verb::Traffic(verb) => traffic_verb(verb),
        Verb::Status { admin, json } => match status::fetch(admin) {
            Ok(value) => {
                if json {
                    println!("{value:#}");
                } else {
                    print!("{}", status::render(&value));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trellis status: {e}");
                ExitCode::FAILURE
            }
        },
        Verb::Identity(Identity::Issue { ca_dir, id, hours, out }) => {
            match identity::issue(&ca_dir, &id, hours, &out) {
                Ok(said) => {
                    println!("{said}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("trellis identity issue: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Verb::Lab(verb) => lab::run(verb),
        Verb::Demo(verb) => demo::run(verb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_lists_every_verb_of_the_design() {
        let help = Cli::command().render_long_help().to_string();
        for verb in [
            "federation",
            "namespace",
            "service",
            "waypoint",
            "traffic",
            "status",
            "lab",
        ] {
            assert!(help.contains(verb), "--help lacks {verb}:\n{help}");
        }
    }

    #[test]
    fn traffic_shift_takes_weights_or_clear_but_not_both_nor_neither() {
        let shift = |extra: &[&str]| {
            let mut args = vec!["trellis", "traffic", "shift", "-n", "shop", "cart"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(shift(&["--clear"]).is_ok());
        assert!(shift(&["--cluster", "east=1"]).is_ok());
        let both = shift(&["--cluster", "east=1", "--clear"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict, "{both}");
        let neither = shift(&[]).unwrap_err();
        assert_eq!(
            neither.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{neither}"
        );
    }

    #[test]
    fn the_design_examples_parse() {
        let examples: [&[&str]; 11] = [
            &[
                "trellis",
                "service",
                "label",
                "-n",
                "shop",
                "cart",
                "trellis.io/global=true",
            ],
            &[
                "trellis",
                "federation",
                "join",
                "--cluster",
                "east",
                "--etcd",
                "https://etcd.example:2379",
            ],
            &[
                "trellis",
                "namespace",
                "label",
                "shop",
                "trellis.io/dataplane-mode=ambient",
            ],
            &["trellis", "waypoint", "apply", "-n", "shop"],
            &[
                "trellis",
                "traffic",
                "shift",
                "-n",
                "shop",
                "cart",
                "--cluster",
                "east=90,west=10",
            ],
            &["trellis", "traffic", "status", "-n", "shop", "cart"],
            &["trellis", "status", "--admin", "127.0.0.1:15014"],
            &["trellis", "lab", "up"],
            &[
                "trellis",
                "lab",
                "up",
                "--name",
                "t1",
                "--file",
                "x.yaml",
                "--bin-dir",
                "target/debug",
            ],
            &["trellis", "lab", "down", "--name", "t1", "--state-dir", "/tmp/t1"],
            &[
                "trellis",
                "demo",
                "call",
                "--url",
                "http://10.1.2.10:8080/",
                "--send-bytes",
                "10",
            ],
        ];
        for args in examples {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }
}
