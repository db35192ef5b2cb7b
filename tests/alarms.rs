//! The broker's resource alarms, raised for real with `rabbitmqctl`: the relay notices
//! `connection.blocked`, stops claiming, reports it, and resumes without loss.
//!
//! The alarms are broker-wide, so this file holds one test that raises them in turn; its
//! guard puts the broker's settings back even when an assertion fails.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("rabbitmqctl could not run ({e}): these tests need it on PATH, as root")
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Restores the memory watermark and disk limit read at creation, whatever happens.
struct BrokerSettings {
    watermark: String,
    disk_limit: String,
}

impl BrokerSettings {
    fn save() -> Self {
        BrokerSettings {
            watermark: rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]),
            disk_limit: rabbitmqctl(&["eval", "rabbit_disk_monitor:get_disk_free_limit()."]),
        }
    }

    fn restore(&self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.watermark]);
        rabbitmqctl(&["set_disk_free_limit", &self.disk_limit]);
    }
}

impl Drop for BrokerSettings {
    fn drop(&mut self) {
        self.restore();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_disk_alarms_block_the_relay_which_reports_and_resumes_without_loss() {
    let db = TestDb::new().await;
    let queue = TestQueue::new().await;
    let relay = Relay::start(&db.url, &db.table, &[("OUTBOX_CONFIRM_TIMEOUT", "5s")]);
    eventually("the relay to be ready", Duration::from_secs(20), || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    let settings = BrokerSettings::save();
    let mut ids = HashSet::new();

    let alarms: [(&str, &[&str]); 2] = [
        ("memory", &["set_vm_memory_high_watermark", "0.000001"]),
        ("disk", &["set_disk_free_limit", "100000GB"]),
    ];
    for (round, (resource, raise)) in alarms.into_iter().enumerate() {
        rabbitmqctl(raise);
        // RabbitMQ tells a connection it is blocked when it next publishes.
        for seq in 0..20 {
            ids.insert(
                db.insert(&queue.name, Some("k"), json!({"round": round, "seq": seq}))
                    .await,
            );
        }
        eventually(
            &format!("{resource} alarm to be reported"),
            Duration::from_secs(30),
            || async { relay.metric("outbox_broker_blocked").await == Some(1.0) },
        )
        .await;
        let (code, body) = relay.get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("broker blocked publishing") && body.contains(resource),
            "{body}"
        );
        assert!(
            relay.get("/").await.1.contains(resource),
            "status page does not show the alarm"
        );

        // Rows committed during the alarm wait; the consumer side is not blocked.
        for seq in 20..40 {
            ids.insert(
                db.insert(&queue.name, Some("k"), json!({"round": round, "seq": seq}))
                    .await,
            );
        }
        settings.restore();
        eventually("the relay to resume", Duration::from_secs(30), || async {
            relay.metric("outbox_broker_blocked").await == Some(0.0)
                && relay.get("/readyz").await.0 == 200
        })
        .await;
        let delivered = ids.len();
        eventually(
            "every row to be delivered",
            Duration::from_secs(60),
            || async {
                queue
                    .received()
                    .iter()
                    .map(|m| m.message_id.clone())
                    .collect::<HashSet<_>>()
                    .len()
                    == delivered
            },
        )
        .await;
    }
    let got: HashSet<String> = queue.received().into_iter().map(|m| m.message_id).collect();
    assert_eq!(got, ids);
    let log = relay.log_text();
    assert!(
        log.matches("broker blocked publishing").count() >= 2,
        "one warning per change expected:\n{log}"
    );
}
