//! A three-node RabbitMQ cluster on this machine (`scripts/rabbitmq-cluster.sh`): the relay
//! publishes with all three nodes in `AMQP_URL` while rows are committed; the node it is
//! connected to is stopped, later another one, and then (the twin of a stop) the connection
//! to its node is frozen without closing; nothing is lost, order per key is kept, and the
//! inbox consumer (quorum queue, concurrency 1) applies every message once and in order.
//! (The raw recorder of the chaos test is left out: a bare lapin consumer sometimes stays
//! attached to a quorum queue replica that lost its node and receives nothing more.)

mod common;

use std::process::Command;

use common::workload::Workload;
use common::*;
use outbox::inbox::QueueType;

fn cluster(args: &[&str]) -> String {
    script("rabbitmq-cluster.sh", args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_fails_over_when_nodes_of_the_cluster_are_lost() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("outbox=info")
        .with_test_writer()
        .try_init();
    cluster(&["start"]);
    // Stops the cluster's nodes and deletes their data.
    let _teardown = Teardown {
        script: "rabbitmq-cluster.sh",
        keep: "OUTBOX_KEEP_CLUSTER",
    };
    let urls: Vec<String> = cluster(&["urls"]).split(',').map(str::to_owned).collect();
    let w = Workload::start(Backend::Postgres, &urls, QueueType::Quorum, false).await;
    let members = Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            "outbox1@localhost",
            "list_queues",
            "name",
            "members",
            "--formatter",
            "json",
        ])
        .output()
        .unwrap();
    let queues: Vec<serde_json::Value> = serde_json::from_slice(&members.stdout).unwrap();
    for q in &queues {
        assert_eq!(
            q["members"].as_array().map(Vec::len),
            Some(3),
            "a quorum queue without a replica on every node: {q}"
        );
    }
    // The relay reaches each node through a fault proxy of its own.
    let mut proxies = Vec::new();
    for url in &urls {
        let port = url::Url::parse(url).unwrap().port().unwrap();
        proxies.push(Proxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await);
    }
    let amqp: Vec<String> = proxies
        .iter()
        .map(|p| format!("amqp://guest:guest@{}/%2f", p.addr))
        .collect();
    let amqp = amqp.join(",");
    let relay = Relay::start(
        &w.db.url,
        &w.db.table,
        &[
            ("AMQP_URL", amqp.as_str()),
            ("OUTBOX_CONFIRM_TIMEOUT", "5s"),
            ("OUTBOX_BACKOFF_MAX", "2s"),
        ],
    );
    w.converge("cluster of three").await;
    // The node (1-3) the relay last connected to.
    let node = || {
        let log = relay.log_text();
        let line = log
            .lines()
            .rfind(|l| l.contains("connected to the broker"))
            .unwrap_or_default()
            .to_owned();
        let on = |p: &Proxy| line.contains(&format!(":{}/", p.addr.port()));
        proxies.iter().position(on).map_or(0, |i| i + 1)
    };
    assert_eq!(
        node(),
        1,
        "the relay should start on the first node: {}",
        relay.log_text()
    );

    cluster(&["stop-node", "1"]);
    w.converge("node 1 (the relay's) stopped").await;
    assert_ne!(node(), 1, "the relay should have failed over");
    cluster(&["start-node", "1"]);
    w.converge("node 1 back").await;

    let current = node();
    cluster(&["stop-node", &current.to_string()]);
    w.converge("the relay's node stopped again").await;
    assert_ne!(node(), current, "the relay should have failed over");
    cluster(&["start-node", &current.to_string()]);

    let current = node();
    proxies[current - 1].freeze_all();
    // Silence is noticed by the confirm timeout (5 s here) or the heartbeat (20 s).
    eventually(
        "the relay to leave its frozen node",
        std::time::Duration::from_secs(60),
        || async { node() != current },
    )
    .await;
    w.converge("the relay's node frozen, nothing closed").await;
    proxies[current - 1].thaw();

    let totals = w.finish().await;
    println!("{totals:?}");
}
