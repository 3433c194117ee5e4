use enforcer_testbed::{Topology, policies};
use serde_json::Value;
use std::{path::Path, process::Command};
const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");

fn pps(topology: &Topology) -> f64 {
    let mut v: Vec<f64> = (0..3)
        .map(|_| {
            let out = topology
                .iperf3(
                    "client",
                    "server",
                    &["-u", "-b", "0", "-l", "64", "-t", "3"],
                )
                .unwrap();
            let r: Value = serde_json::from_slice(&out).unwrap();
            r["end"]["sum_received"]["bytes"].as_f64().unwrap()
                / 64.0
                / r["end"]["sum_received"]["seconds"].as_f64().unwrap()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[1]
}

fn main() {
    let topology = Topology::build(&["client", "server"]).unwrap();
    let (client, server) = (
        topology.endpoint("client").ipv4,
        topology.endpoint("server").ipv4,
    );
    //println!("none {:.0}", pps(&topology));
    let policy = format!(
        "{}[[service]]\nname = \"client\"\ninterfaces = [\"v-client\"]\naddresses = [\"{client}/32\"]\n\
         [[service]]\nname = \"server\"\ninterfaces = [\"v-server\"]\naddresses = [\"{server}/32\"]\n\
         [[allow]]\nfrom = \"client\"\nto = \"server\"\nports = [\"5201/tcp\", \"5201/udp\"]\n",
        policies::generated(200, 10000)
    );
    let p = topology.write_file("policy.toml", &policy).unwrap();
    let daemon = topology
        .run_enforcer(
            Path::new(ENFORCER),
            &["--policy".as_ref(), p.as_os_str()],
            "e.log",
        )
        .unwrap();
    for _ in 0..3 {
        println!("enforcer {:.0}", pps(&topology));
    }
    println!(
        "bpftool: {}",
        String::from_utf8_lossy(
            &Command::new("bpftool")
                .args(["link", "show"])
                .output()
                .unwrap()
                .stdout
        )
        .lines()
        .count()
    );
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let links: Value = serde_json::from_slice(&out.stdout).unwrap();
    for l in links.as_array().unwrap() {
        println!("LINK {} {} {}", l["id"], l["type"], l["attach_type"]);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let ids: Vec<String> = std::env::var("DETACH")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let _ = ids;
    // detach egress tcx links of both veths
    for l in links.as_array().unwrap() {
        let text = String::from_utf8_lossy(
            &Command::new("bpftool")
                .args(["link", "show", "id", &l["id"].to_string()])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        println!("TEXT {text}");
        let prog = text
            .split("prog ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("0")
            .to_owned();
        let ptext = String::from_utf8_lossy(
            &Command::new("bpftool")
                .args(["prog", "show", "id", &prog])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        println!("PROG {ptext}");
        if ptext.contains("egress") && std::env::var("KEEP").is_err() {
            let id = l["id"].to_string();
            let s = Command::new("bpftool")
                .args(["link", "detach", "id", &id])
                .status()
                .unwrap();
            println!("detached {id} {s}");
        }
    }
    for _ in 0..3 {
        println!("ingress only {:.0}", pps(&topology));
    }
    drop(daemon);
}
