//! Raising the broker's resource alarms for real with `rabbitmqctl`, and putting its
//! settings back whatever happens. The alarms are broker-wide: keep them short.

use std::process::Command;

/// Runs `rabbitmqctl` with `args`; its output. Panics with a hint when it cannot run.
pub fn rabbitmqctl(args: &[&str]) -> String {
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
pub struct BrokerSettings {
    watermark: String,
    disk_limit: String,
}

impl BrokerSettings {
    pub fn save() -> Self {
        BrokerSettings {
            watermark: rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]),
            disk_limit: rabbitmqctl(&["eval", "rabbit_disk_monitor:get_disk_free_limit()."]),
        }
    }

    pub fn restore(&self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.watermark]);
        rabbitmqctl(&["set_disk_free_limit", &self.disk_limit]);
    }
}

impl Drop for BrokerSettings {
    fn drop(&mut self) {
        self.restore();
    }
}
