//! `trellis_config_connected` follows the config stream in the lab: 1 while ztunnel's stream to
//! trellisd delivers, 0 once trellisd is gone, 1 again when it is back.

use std::time::{Duration, Instant};

use trellis_e2e::lab::{metric_sum, Lab};

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 1}
namespaces:
  - {name: mesh, ambient: true}
pods:
  - {name: alpha, namespace: mesh, node: node-1, serviceAccount: alpha}
"#;

fn connected(lab: &Lab) -> f64 {
    metric_sum(&lab.metrics("east", "node-1"), "trellis_config_connected", &[])
}

fn wait_connected(lab: &Lab, want: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected(lab) != want {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn config_connected_follows_the_stream_to_trellisd() {
    let lab = Lab::up("e2econn", TOPOLOGY);
    wait_connected(&lab, 1.0, "trellis_config_connected 1 with trellisd up");
    let _ = lab.kill_all_in(&lab.control_ns("east"));
    wait_connected(&lab, 0.0, "trellis_config_connected 0 with trellisd dead");
    lab.restart("trellisd-east", &lab.control_ns("east"));
    wait_connected(&lab, 1.0, "trellis_config_connected 1 once trellisd is back");
}
