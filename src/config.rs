//! The one place that reads the environment.
//!
//! Every variable is checked and every problem reported (one line each), so an operator
//! fixes a deployment in one go. No value of a URL variable is ever echoed: it may hold a
//! password.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::broker::{AmqpTls, ClientIdentity, check_certificates, check_private_key};
use crate::{StoreOptions, TableName};

/// Everything the sidecar is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`: `postgres://…` or `mysql://…`.
    pub database_url: String,
    /// `OUTBOX_TABLE`: the outbox table (default `outbox`).
    pub table: TableName,
    /// `OUTBOX_RETENTION`: how long sent rows are kept (default 0: deleted once confirmed).
    pub retention: Duration,
    /// `OUTBOX_DEDUP_WINDOW`: how long the consumers' inboxes remember message ids (default
    /// 7 days); `outbox dead retry` refuses older rows without `--force`.
    pub dedup_window: Duration,
    /// `OUTBOX_QUERY_TIMEOUT`: one database statement at most, waiting for a pooled
    /// connection included (default 10s).
    pub query_timeout: Duration,
    /// `OUTBOX_LOG_FORMAT`: `text` (the default, for people) or `json` (one object a line).
    pub log_format: LogFormat,
    /// `OUTBOX_REPLICA_ID`: this relay's name on the status page and in `<table>_leader`
    /// (default: host name and pid).
    pub replica_id: String,
    /// The relay's own settings.
    pub relay: RelayConfig,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message and the event's fields.
    Json,
}

/// What only `outbox relay` needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `AMQP_URL`: the broker's nodes, comma-separated.
    pub amqp_urls: Vec<String>,
    /// `OUTBOX_AMQP_CA_FILE`, `OUTBOX_AMQP_CLIENT_CERT`, `OUTBOX_AMQP_CLIENT_KEY`: how
    /// `amqps://` nodes are verified and this relay presents itself to them.
    pub amqp_tls: AmqpTls,
    /// `OUTBOX_HTTP_ADDR`: where the HTTP endpoints listen (default `0.0.0.0:8787`).
    pub http_addr: Option<SocketAddr>,
    /// `OUTBOX_APP_ID`: the AMQP `app_id` property.
    pub app_id: Option<String>,
    /// `OUTBOX_BATCH_SIZE`: rows per claim (default 500).
    pub batch_size: usize,
    /// `OUTBOX_MAX_IN_FLIGHT`: unconfirmed publishes at most (default 1000).
    pub max_in_flight: usize,
    /// `OUTBOX_MAX_IN_FLIGHT_BYTES`: the text of the rows held from claim to mark, at most
    /// (default 16 MiB; one row larger than that still goes out, alone).
    pub max_in_flight_bytes: usize,
    /// `OUTBOX_MAX_MESSAGE_SIZE`: bodies larger than this are bad rows, dead at once
    /// (default 128 MiB, RabbitMQ 3's largest `max_message_size`; the relay also learns a
    /// smaller limit from the broker the first time it refuses a body).
    pub max_message_size: usize,
    /// `OUTBOX_POLL_INTERVAL`: how often to look at the whole table while notifications are
    /// not arriving (default 1s).
    pub poll_interval: Duration,
    /// `OUTBOX_CONFIRM_TIMEOUT`: a publish with no confirm by then is retried (default 30s).
    pub confirm_timeout: Duration,
    /// `OUTBOX_CONNECT_TIMEOUT`: one broker or database connection attempt at most (default 10s).
    pub connect_timeout: Duration,
    /// `OUTBOX_BACKOFF_MIN`: first retry delay of a failed row (default 1s).
    pub backoff_min: Duration,
    /// `OUTBOX_BACKOFF_MAX`: cap of the retry delay (default 5m).
    pub backoff_max: Duration,
    /// `OUTBOX_MAX_ATTEMPTS`: attempts in all before a row is dead (default 10).
    pub max_attempts: u32,
    /// `OUTBOX_SHUTDOWN_GRACE`: how long a stop waits for outstanding confirms (default 10s).
    pub shutdown_grace: Duration,
    /// `OUTBOX_LEADER_CHECK`: how often a standby tries to lead and a leader checks its lock (default 1s).
    pub leader_check: Duration,
    /// `OUTBOX_LEASE_TIMEOUT`: the database ends the leader's lease session after this long
    /// without a word from it, so a leader whose host vanished loses the table within it;
    /// the leader stops publishing at half of it without an answer (default 10s).
    pub lease_timeout: Duration,
    /// `OUTBOX_STALL_TIMEOUT`: `/healthz` fails when the leader has held pending rows this
    /// long without progress while the broker does not block it (default 5m).
    pub stall_timeout: Duration,
    /// `OUTBOX_ADMIN_TOKEN` (or `OUTBOX_ADMIN_TOKEN_FILE`): the bearer token of the mutating
    /// HTTP endpoints; `None` leaves the HTTP side read-only.
    pub admin_token: Option<Secret>,
}

/// A value never printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for comparison; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl RelayConfig {
    /// The documented defaults, for a relay embedded in a program rather than configured
    /// by the environment.
    pub fn new(amqp_urls: Vec<String>) -> Self {
        RelayConfig {
            amqp_urls,
            amqp_tls: AmqpTls::default(),
            http_addr: Some(SocketAddr::from(([0, 0, 0, 0], 8787))),
            app_id: None,
            batch_size: 500,
            max_in_flight: 1000,
            max_in_flight_bytes: 16 << 20,
            max_message_size: 128 << 20,
            poll_interval: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            max_attempts: 10,
            shutdown_grace: Duration::from_secs(10),
            leader_check: Duration::from_secs(1),
            lease_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(300),
            admin_token: None,
        }
    }

    /// How often the leader looks at the table (and so proves its lease): every leader
    /// check, and at least every poll interval.
    pub fn look_interval(&self) -> Duration {
        self.leader_check.min(self.poll_interval)
    }
}

impl Config {
    /// Reads the process environment; `AMQP_URL` is required when `needs_broker`.
    pub fn from_env(needs_broker: bool) -> Result<Config, Vec<String>> {
        Self::from_vars(|name| std::env::var(name).ok(), needs_broker)
    }

    /// Reads configuration from `var`, reporting every invalid variable.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        needs_broker: bool,
    ) -> Result<Config, Vec<String>> {
        let mut r = Reader {
            var: &var,
            errors: Vec::new(),
        };
        let database_url = r.database_url();
        let table = r.parse("OUTBOX_TABLE", TableName::default(), |s| {
            TableName::new(s).map_err(|e| e.to_string())
        });
        let retention = r.duration("OUTBOX_RETENTION", Duration::ZERO);
        let dedup_window = r.duration("OUTBOX_DEDUP_WINDOW", Duration::from_secs(7 * 24 * 3600));
        let query_timeout = r.duration("OUTBOX_QUERY_TIMEOUT", Duration::from_secs(10));
        let log_format = r.parse("OUTBOX_LOG_FORMAT", LogFormat::Text, |s| match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected text or json, got {s:?}")),
        });
        let replica_id = r.replica_id();
        let d = RelayConfig::new(Vec::new());
        let relay = RelayConfig {
            amqp_urls: r.amqp_urls(needs_broker),
            amqp_tls: r.amqp_tls(),
            http_addr: r.parse("OUTBOX_HTTP_ADDR", d.http_addr, |s| {
                if s.is_empty() {
                    return Ok(None);
                }
                SocketAddr::from_str(s)
                    .map(Some)
                    .map_err(|_| format!("expected HOST:PORT such as 0.0.0.0:8787, got {s:?}"))
            }),
            app_id: r.app_id(),
            batch_size: r.positive("OUTBOX_BATCH_SIZE", d.batch_size),
            max_in_flight: r.positive("OUTBOX_MAX_IN_FLIGHT", d.max_in_flight),
            max_in_flight_bytes: r.parse(
                "OUTBOX_MAX_IN_FLIGHT_BYTES",
                d.max_in_flight_bytes,
                bytes,
            ),
            max_message_size: r.parse("OUTBOX_MAX_MESSAGE_SIZE", d.max_message_size, bytes),
            poll_interval: r.duration("OUTBOX_POLL_INTERVAL", d.poll_interval),
            confirm_timeout: r.duration("OUTBOX_CONFIRM_TIMEOUT", d.confirm_timeout),
            connect_timeout: r.duration("OUTBOX_CONNECT_TIMEOUT", d.connect_timeout),
            backoff_min: r.duration("OUTBOX_BACKOFF_MIN", d.backoff_min),
            backoff_max: r.duration("OUTBOX_BACKOFF_MAX", d.backoff_max),
            max_attempts: r.positive("OUTBOX_MAX_ATTEMPTS", d.max_attempts),
            shutdown_grace: r.duration("OUTBOX_SHUTDOWN_GRACE", d.shutdown_grace),
            leader_check: r.duration("OUTBOX_LEADER_CHECK", d.leader_check),
            lease_timeout: r.duration("OUTBOX_LEASE_TIMEOUT", d.lease_timeout),
            stall_timeout: r.duration("OUTBOX_STALL_TIMEOUT", d.stall_timeout),
            admin_token: r.admin_token(),
        };
        for (name, d) in [
            ("OUTBOX_POLL_INTERVAL", relay.poll_interval),
            ("OUTBOX_CONFIRM_TIMEOUT", relay.confirm_timeout),
            ("OUTBOX_CONNECT_TIMEOUT", relay.connect_timeout),
            ("OUTBOX_LEADER_CHECK", relay.leader_check),
            ("OUTBOX_QUERY_TIMEOUT", query_timeout),
        ] {
            if d.is_zero() {
                r.errors.push(format!("{name}: must be greater than zero"));
            }
        }
        if relay.lease_timeout < 3 * relay.look_interval() {
            r.errors.push(
                "OUTBOX_LEASE_TIMEOUT: must be at least three times OUTBOX_LEADER_CHECK and OUTBOX_POLL_INTERVAL (the smaller of them)"
                    .into(),
            );
        }
        let tls_named = ["OUTBOX_AMQP_CA_FILE", "OUTBOX_AMQP_CLIENT_CERT"]
            .iter()
            .any(|name| var(name).is_some());
        if tls_named && relay.amqp_urls.iter().any(|u| u.starts_with("amqp://")) {
            r.errors.push("AMQP_URL: an amqp:// entry would be plain text while OUTBOX_AMQP_CA_FILE or OUTBOX_AMQP_CLIENT_CERT is set: use amqps://".into());
        }
        if relay.backoff_min > relay.backoff_max {
            r.errors
                .push("OUTBOX_BACKOFF_MIN: must not exceed OUTBOX_BACKOFF_MAX".into());
        }
        match r.errors.is_empty() {
            true => Ok(Config {
                database_url,
                table,
                retention,
                dedup_window,
                query_timeout,
                log_format,
                replica_id,
                relay,
            }),
            false => Err(r.errors),
        }
    }
}

impl Config {
    /// How the store treats the table.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            retention: self.retention,
            query_timeout: self.query_timeout,
            connect_timeout: self.relay.connect_timeout,
            lease_timeout: self.relay.lease_timeout,
            holder: self.replica_id.clone(),
            ..StoreOptions::new(self.table.clone())
        }
    }
}

/// A positive size: `65536`, `512KiB`, `64MiB`, `1GiB`.
fn bytes(s: &str) -> Result<usize, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => 0,
    };
    match digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a positive size such as 64MiB, got {s:?}")),
    }
}

/// Reads variables and collects what is wrong with them.
struct Reader<'a> {
    var: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
}

impl Reader<'_> {
    fn parse<T>(&mut self, name: &str, default: T, parse: impl Fn(&str) -> Result<T, String>) -> T {
        match (self.var)(name) {
            None => default,
            Some(raw) => parse(raw.trim()).unwrap_or_else(|why| {
                self.errors.push(format!("{name}: {why}"));
                default
            }),
        }
    }

    /// A duration of at most a century: the relay adds them to clock readings, which a
    /// duration near `u64::MAX` seconds (humantime parses those) overflows.
    fn duration(&mut self, name: &str, default: Duration) -> Duration {
        // humantime's year: 365.25 days.
        const CENTURY: Duration = Duration::from_secs(100 * 31_557_600);
        self.parse(name, default, |s| match humantime::parse_duration(s) {
            Ok(d) if d <= CENTURY => Ok(d),
            Ok(_) => Err(format!("at most 100 years, got {s:?}")),
            Err(_) => Err(format!(
                "expected a duration such as 500ms, 5s or 7d, got {s:?}"
            )),
        })
    }

    fn positive<T: FromStr + Default + PartialEq>(&mut self, name: &str, default: T) -> T {
        self.parse(name, default, |s| match s.parse::<T>() {
            Ok(v) if v != T::default() => Ok(v),
            _ => Err(format!("expected a positive whole number, got {s:?}")),
        })
    }

    /// Variable `name`, or the content of the file `<name>_FILE` names (the convention of
    /// mounted secrets; trailing newline trimmed). Both set is an error.
    fn secret(&mut self, name: &str) -> Option<String> {
        let file = format!("{name}_FILE");
        match ((self.var)(name), (self.var)(&file)) {
            (Some(_), Some(_)) => {
                self.errors
                    .push(format!("{name}: set it or {file}, not both"));
                None
            }
            (Some(value), None) => Some(value),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_owned()),
                Err(e) => {
                    self.errors
                        .push(format!("{file}: cannot read {path:?} ({e})"));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn database_url(&mut self) -> String {
        let Some(url) = self.secret("DATABASE_URL").filter(|s| !s.trim().is_empty()) else {
            if self.errors.iter().any(|e| e.starts_with("DATABASE_URL")) {
                return String::new();
            }
            self.errors.push(
                "DATABASE_URL: required, e.g. postgres://user@host/db or mysql://user@host/db"
                    .into(),
            );
            return String::new();
        };
        match url::Url::parse(url.trim()) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql" | "mysql" | "mariadb") => {
                url.trim().to_owned()
            }
            Ok(u) => {
                self.errors.push(format!(
                    "DATABASE_URL: unsupported scheme {:?} (expected postgres:// or mysql://)",
                    u.scheme()
                ));
                String::new()
            }
            Err(e) => {
                self.errors
                    .push(format!("DATABASE_URL: not a valid URL ({e})"));
                String::new()
            }
        }
    }

    /// `OUTBOX_REPLICA_ID`, or the host name and pid; at most 255 bytes (MySQL's column).
    fn replica_id(&mut self) -> String {
        let default = crate::store::holder();
        self.parse("OUTBOX_REPLICA_ID", default.clone(), |s| match s.len() {
            0 => Ok(default.clone()),
            1..=255 => Ok(s.to_owned()),
            _ => Err("at most 255 bytes".into()),
        })
    }

    /// `OUTBOX_APP_ID`, as given (unset or empty: none); at most 255 bytes, an AMQP short
    /// string.
    fn app_id(&mut self) -> Option<String> {
        let app_id = (self.var)("OUTBOX_APP_ID").filter(|s| !s.is_empty())?;
        if app_id.len() > 255 {
            self.errors
                .push("OUTBOX_APP_ID: at most 255 bytes (an AMQP short string)".into());
            return None;
        }
        Some(app_id)
    }

    /// `OUTBOX_ADMIN_TOKEN` or the content of `OUTBOX_ADMIN_TOKEN_FILE` (trailing newline
    /// trimmed); never echoed.
    fn admin_token(&mut self) -> Option<Secret> {
        let token = self.secret("OUTBOX_ADMIN_TOKEN")?;
        if token.trim().is_empty() {
            self.errors
                .push("OUTBOX_ADMIN_TOKEN: must not be empty".into());
            return None;
        }
        Some(Secret(token))
    }

    /// The broker's TLS files, read and checked now: a missing or invalid one is reported.
    fn amqp_tls(&mut self) -> AmqpTls {
        let (cert_var, key_var) = ("OUTBOX_AMQP_CLIENT_CERT", "OUTBOX_AMQP_CLIENT_KEY");
        let ca = self.pem_file("OUTBOX_AMQP_CA_FILE", check_certificates);
        let cert = self.pem_file(cert_var, check_certificates);
        let key = self.pem_file(key_var, check_private_key);
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert,
                key: Secret(key),
            }),
            _ => {
                for (set, unset) in [(cert_var, key_var), (key_var, cert_var)] {
                    if (self.var)(set).is_some() && (self.var)(unset).is_none() {
                        self.errors.push(format!("{unset}: required with {set}"));
                    }
                }
                None
            }
        };
        AmqpTls { ca, client }
    }

    /// The content of the PEM file that `name` names, if set, checked by `check`; never
    /// echoed (it may be a private key).
    fn pem_file(&mut self, name: &str, check: fn(&str) -> Result<(), String>) -> Option<String> {
        let path = (self.var)(name)?;
        let text = match std::fs::read_to_string(path.trim()) {
            Ok(text) => text,
            Err(e) => {
                self.errors
                    .push(format!("{name}: cannot read {path:?} ({e})"));
                return None;
            }
        };
        match check(&text) {
            Ok(()) => Some(text),
            Err(why) => {
                self.errors.push(format!("{name}: {path:?}: {why}"));
                None
            }
        }
    }

    fn amqp_urls(&mut self, required: bool) -> Vec<String> {
        let Some(raw) = self.secret("AMQP_URL").filter(|s| !s.trim().is_empty()) else {
            if required && !self.errors.iter().any(|e| e.starts_with("AMQP_URL")) {
                self.errors.push("AMQP_URL: required, e.g. amqp://user:password@host:5672/%2f (several, comma-separated, for a cluster)".into());
            }
            return Vec::new();
        };
        let urls: Vec<String> = raw
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        for (i, u) in urls.iter().enumerate() {
            let scheme_ok = u.starts_with("amqp://") || u.starts_with("amqps://");
            if !scheme_ok || u.parse::<lapin::uri::AMQPUri>().is_err() {
                self.errors.push(format!(
                    "AMQP_URL: entry {} is not a valid amqp:// or amqps:// URL",
                    i + 1
                ));
            }
        }
        urls
    }
}

/// The URL with its password replaced by `***`, for logs and messages: the user info's,
/// and any query parameter whose name contains `password` (`?password=`, `sslpassword=`).
pub fn redact(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return "<unparseable URL>".to_owned();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query_pairs().any(|(name, _)| is_secret(&name)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(name, value)| {
                let value = if is_secret(&name) {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// A query parameter that carries a secret.
fn is_secret(name: &str) -> bool {
    name.to_ascii_lowercase().contains("password")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)], needs_broker: bool) -> Result<Config, Vec<String>> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| vars.get(k).cloned(), needs_broker)
    }

    #[test]
    fn every_bad_variable_is_named_once() {
        let errors = read(
            &[
                ("DATABASE_URL", "http://u:secret@h/db"),
                ("AMQP_URL", "amqp://u:hunter2@h,nope"),
                ("OUTBOX_BATCH_SIZE", "0"),
                ("OUTBOX_TABLE", "a;b"),
                ("OUTBOX_POLL_INTERVAL", "soon"),
            ],
            true,
        )
        .unwrap_err();
        let text = errors.join("\n");
        for name in [
            "DATABASE_URL",
            "AMQP_URL: entry 2",
            "OUTBOX_BATCH_SIZE",
            "OUTBOX_TABLE",
            "OUTBOX_POLL_INTERVAL",
        ] {
            assert!(text.contains(name), "{name} not reported in {text}");
        }
        assert_eq!(errors.len(), 5, "{text}");
        assert!(
            !text.contains("secret") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn defaults_and_cluster_lists() {
        let c = read(
            &[
                ("DATABASE_URL", "postgres://h/db"),
                ("AMQP_URL", "amqp://a, amqp://b:5673"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(c.relay.amqp_urls, ["amqp://a", "amqp://b:5673"]);
        assert_eq!(c.table.as_str(), "outbox");
        assert_eq!(c.relay.max_attempts, 10);
        assert!(read(&[("DATABASE_URL", "postgres://h/db")], true).is_err());
        assert!(read(&[("DATABASE_URL", "postgres://h/db")], false).is_ok());
    }

    #[test]
    fn admin_token_and_replica_id() {
        let base = [("DATABASE_URL", "postgres://h/db")];
        let c = read(&base, false).unwrap();
        assert!(c.relay.admin_token.is_none());
        assert!(c.replica_id.contains("pid"), "{}", c.replica_id);
        let c = read(
            &[
                base[0],
                ("OUTBOX_ADMIN_TOKEN", "s3cret"),
                ("OUTBOX_REPLICA_ID", "relay-a"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(c.relay.admin_token.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(c.replica_id, "relay-a");
        assert!(!format!("{c:?}").contains("s3cret"));
        let path = std::env::temp_dir().join(format!("token-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let file = path.to_str().unwrap();
        let c = read(&[base[0], ("OUTBOX_ADMIN_TOKEN_FILE", file)], false).unwrap();
        assert_eq!(c.relay.admin_token.unwrap().expose(), "from-file");
        let both = [
            base[0],
            ("OUTBOX_ADMIN_TOKEN", "x"),
            ("OUTBOX_ADMIN_TOKEN_FILE", file),
        ];
        assert_eq!(read(&both, false).unwrap_err().len(), 1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn amqp_tls_files_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("amqp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let garbage = garbage.to_str().unwrap();
        let missing = dir.join("missing.pem");
        let base = [
            ("DATABASE_URL", "postgres://h/db"),
            ("AMQP_URL", "amqps://u:p@h/%2f"),
        ];
        let errors = read(
            &[
                base[0],
                base[1],
                ("OUTBOX_AMQP_CA_FILE", missing.to_str().unwrap()),
                ("OUTBOX_AMQP_CLIENT_KEY", garbage),
            ],
            true,
        )
        .unwrap_err();
        let text = errors.join("\n");
        assert_eq!(errors.len(), 3, "{text}");
        assert!(text.contains("OUTBOX_AMQP_CA_FILE: cannot read"), "{text}");
        assert!(
            text.contains("OUTBOX_AMQP_CLIENT_KEY") && text.contains("private key"),
            "{text}"
        );
        assert!(
            text.contains("OUTBOX_AMQP_CLIENT_CERT: required with OUTBOX_AMQP_CLIENT_KEY"),
            "{text}"
        );
        assert!(!text.contains("not a certificate"), "{text}");
        let plain = [
            base[0],
            ("AMQP_URL", "amqps://h,amqp://h2"),
            ("OUTBOX_AMQP_CA_FILE", garbage),
        ];
        let text = read(&plain, true).unwrap_err().join("\n");
        assert!(
            text.contains("OUTBOX_AMQP_CA_FILE") && text.contains("amqp:// entry"),
            "{text}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(
            redact("amqp://guest:guest@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=hunter2"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact("mysql://h/db?user=app&sslpassword=s3cret"),
            "mysql://h/db?user=app&sslpassword=***"
        );
        assert_eq!(
            redact("postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem"),
            "postgres://u:***@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        );
        assert_eq!(
            redact("mysql://u:pw@h/db?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem&password=x"),
            "mysql://u:***@h/db?ssl-mode=VERIFY_IDENTITY&ssl-ca=%2Fca.pem&password=***"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::cell::RefCell;
        use std::collections::{BTreeMap, BTreeSet};
        use std::net::IpAddr;

        /// Every variable `from_vars` reads.
        const VARS: [&str; 31] = [
            "DATABASE_URL",
            "DATABASE_URL_FILE",
            "AMQP_URL",
            "AMQP_URL_FILE",
            "OUTBOX_TABLE",
            "OUTBOX_RETENTION",
            "OUTBOX_DEDUP_WINDOW",
            "OUTBOX_QUERY_TIMEOUT",
            "OUTBOX_LOG_FORMAT",
            "OUTBOX_REPLICA_ID",
            "OUTBOX_AMQP_CA_FILE",
            "OUTBOX_AMQP_CLIENT_CERT",
            "OUTBOX_AMQP_CLIENT_KEY",
            "OUTBOX_HTTP_ADDR",
            "OUTBOX_APP_ID",
            "OUTBOX_BATCH_SIZE",
            "OUTBOX_MAX_IN_FLIGHT",
            "OUTBOX_MAX_IN_FLIGHT_BYTES",
            "OUTBOX_MAX_MESSAGE_SIZE",
            "OUTBOX_POLL_INTERVAL",
            "OUTBOX_CONFIRM_TIMEOUT",
            "OUTBOX_CONNECT_TIMEOUT",
            "OUTBOX_BACKOFF_MIN",
            "OUTBOX_BACKOFF_MAX",
            "OUTBOX_MAX_ATTEMPTS",
            "OUTBOX_SHUTDOWN_GRACE",
            "OUTBOX_LEADER_CHECK",
            "OUTBOX_LEASE_TIMEOUT",
            "OUTBOX_STALL_TIMEOUT",
            "OUTBOX_ADMIN_TOKEN",
            "OUTBOX_ADMIN_TOKEN_FILE",
        ];

        /// Any text, or text close to what some variable takes (numbers of any size with
        /// units, URLs, addresses), or around the 255 bytes of an AMQP short string.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[ ]?[0-9]{1,25}[ ]?(ms|s|m|h|d|y|B|KiB|MiB|GiB|TiB)?[ ]?",
                "(postgres|mysql|amqp|amqps|http)://[a-z@:]{0,8}(/[a-z%0-9]{0,4})?(,amqp://h)?",
                "[0-9.:\\[\\]]{0,20}",
                "[a-z]{250,300}",
                Just(String::new()),
            ]
        }

        /// A duration written as a whole number of one unit, between `lo` and `hi` ms.
        fn duration_text(lo: u64, hi: u64) -> BoxedStrategy<(String, Duration)> {
            let units = vec![
                ("ms", 1),
                ("s", 1_000),
                ("m", 60_000),
                ("h", 3_600_000),
                ("d", 86_400_000),
            ];
            prop::sample::select(units)
                .prop_flat_map(move |(unit, ms)| {
                    let (unit, ms) = if lo.div_ceil(ms) <= hi / ms {
                        (unit, ms)
                    } else {
                        ("ms", 1)
                    };
                    (lo.div_ceil(ms)..=hi / ms, "[ ]?", "[ ]?").prop_map(move |(n, a, b)| {
                        (format!("{a}{n}{unit}{b}"), Duration::from_millis(n * ms))
                    })
                })
                .boxed()
        }

        /// What a variable parsed to.
        #[derive(Debug, Clone, PartialEq)]
        enum Parsed {
            Duration(Duration),
            Number(u64),
            Text(String),
            Addr(Option<SocketAddr>),
        }

        /// Where each variable of a plain value lands in `c`.
        fn field(c: &Config, name: &str) -> Option<Parsed> {
            let r = &c.relay;
            let d = Parsed::Duration;
            let n = |v: usize| Parsed::Number(v as u64);
            Some(match name {
                "OUTBOX_RETENTION" => d(c.retention),
                "OUTBOX_DEDUP_WINDOW" => d(c.dedup_window),
                "OUTBOX_QUERY_TIMEOUT" => d(c.query_timeout),
                "OUTBOX_POLL_INTERVAL" => d(r.poll_interval),
                "OUTBOX_CONFIRM_TIMEOUT" => d(r.confirm_timeout),
                "OUTBOX_CONNECT_TIMEOUT" => d(r.connect_timeout),
                "OUTBOX_BACKOFF_MIN" => d(r.backoff_min),
                "OUTBOX_BACKOFF_MAX" => d(r.backoff_max),
                "OUTBOX_SHUTDOWN_GRACE" => d(r.shutdown_grace),
                "OUTBOX_LEADER_CHECK" => d(r.leader_check),
                "OUTBOX_LEASE_TIMEOUT" => d(r.lease_timeout),
                "OUTBOX_STALL_TIMEOUT" => d(r.stall_timeout),
                "OUTBOX_BATCH_SIZE" => n(r.batch_size),
                "OUTBOX_MAX_IN_FLIGHT" => n(r.max_in_flight),
                "OUTBOX_MAX_IN_FLIGHT_BYTES" => n(r.max_in_flight_bytes),
                "OUTBOX_MAX_MESSAGE_SIZE" => n(r.max_message_size),
                "OUTBOX_MAX_ATTEMPTS" => Parsed::Number(r.max_attempts.into()),
                "OUTBOX_LOG_FORMAT" => Parsed::Text(format!("{:?}", c.log_format).to_lowercase()),
                "OUTBOX_TABLE" => Parsed::Text(c.table.as_str().into()),
                "OUTBOX_REPLICA_ID" => Parsed::Text(c.replica_id.clone()),
                "OUTBOX_APP_ID" => Parsed::Text(r.app_id.clone().unwrap_or_default()),
                "OUTBOX_HTTP_ADDR" => Parsed::Addr(r.http_addr),
                "AMQP_URL" => Parsed::Text(r.amqp_urls.join(",")),
                _ => return None,
            })
        }

        /// Well-formed values of the variables, each with what it must parse to; the
        /// durations' ranges keep the cross-checks (lease, backoff) satisfied.
        fn well_formed() -> impl Strategy<Value = Vec<Option<(&'static str, String, Parsed)>>> {
            let dur = |name: &'static str, lo: u64, hi: u64| {
                duration_text(lo, hi)
                    .prop_map(move |(t, d)| (name, t, Parsed::Duration(d)))
                    .boxed()
            };
            let num = |name: &'static str, hi: u64| {
                (1..=hi, "[ ]?")
                    .prop_map(move |(n, pad)| (name, format!("{pad}{n}"), Parsed::Number(n)))
                    .boxed()
            };
            let size = |name: &'static str| {
                let units = vec![
                    ("", 1),
                    ("B", 1),
                    ("KiB", 1 << 10),
                    ("MiB", 1 << 20),
                    ("GiB", 1 << 30),
                ];
                (1..=1u64 << 20, prop::sample::select(units))
                    .prop_map(move |(n, (u, scale))| {
                        (name, format!("{n}{u}"), Parsed::Number(n * scale))
                    })
                    .boxed()
            };
            let text = |name: &'static str, s: BoxedStrategy<String>| {
                s.prop_map(move |t| (name, t.clone(), Parsed::Text(t)))
                    .boxed()
            };
            let (day, hour) = (86_400_000, 3_600_000);
            let knobs = vec![
                dur("OUTBOX_RETENTION", 0, 30 * day),
                dur("OUTBOX_DEDUP_WINDOW", 0, 30 * day),
                dur("OUTBOX_QUERY_TIMEOUT", 1, hour),
                dur("OUTBOX_CONFIRM_TIMEOUT", 1, hour),
                dur("OUTBOX_CONNECT_TIMEOUT", 1, hour),
                dur("OUTBOX_SHUTDOWN_GRACE", 0, hour),
                dur("OUTBOX_STALL_TIMEOUT", 0, day),
                dur("OUTBOX_POLL_INTERVAL", 1, 10_000),
                dur("OUTBOX_LEADER_CHECK", 1, 10_000),
                dur("OUTBOX_BACKOFF_MIN", 1, 1_000),
                dur("OUTBOX_BACKOFF_MAX", 1_000, day),
                num("OUTBOX_BATCH_SIZE", usize::MAX as u64),
                num("OUTBOX_MAX_IN_FLIGHT", u32::MAX.into()),
                num("OUTBOX_MAX_ATTEMPTS", u32::MAX.into()),
                size("OUTBOX_MAX_IN_FLIGHT_BYTES"),
                size("OUTBOX_MAX_MESSAGE_SIZE"),
                text(
                    "OUTBOX_LOG_FORMAT",
                    prop::sample::select(vec!["text".to_owned(), "json".into()]).boxed(),
                ),
                text("OUTBOX_TABLE", "[a-zA-Z_][a-zA-Z0-9_]{0,47}".boxed()),
                text("OUTBOX_REPLICA_ID", "[^ \\s]{1,63}".boxed()),
                text(
                    "OUTBOX_APP_ID",
                    proptest::collection::vec(any::<char>(), 1..64)
                        .prop_map(String::from_iter)
                        .boxed(),
                ),
                text(
                    "AMQP_URL",
                    proptest::collection::vec("amqps?://[a-z]{1,8}(:[0-9]{4})?", 1..4)
                        .prop_map(|u| u.join(","))
                        .boxed(),
                ),
                (any::<IpAddr>(), any::<u16>())
                    .prop_map(|a| {
                        let a = SocketAddr::from(a);
                        ("OUTBOX_HTTP_ADDR", a.to_string(), Parsed::Addr(Some(a)))
                    })
                    .boxed(),
            ];
            let mut all: Vec<_> = knobs
                .into_iter()
                .map(|k| proptest::option::of(k).boxed())
                .collect();
            // Always given: the lease must be three look intervals at least.
            all.push(
                dur("OUTBOX_LEASE_TIMEOUT", 30_000, day)
                    .prop_map(Some)
                    .boxed(),
            );
            all
        }

        /// Reads `vars`, recording every name asked for.
        fn read_recording(
            vars: &BTreeMap<&str, String>,
            needs_broker: bool,
        ) -> (Result<Config, Vec<String>>, BTreeSet<String>) {
            let asked = RefCell::new(BTreeSet::new());
            let result = Config::from_vars(
                |name| {
                    asked.borrow_mut().insert(name.to_owned());
                    vars.get(name).cloned()
                },
                needs_broker,
            );
            (result, asked.into_inner())
        }

        /// What the relay is given it can use: an app_id fits an AMQP short string, and the
        /// durations it adds to clock readings do not overflow them.
        fn check_usable(c: &Config, vars: &BTreeMap<&str, String>) -> Result<(), TestCaseError> {
            prop_assert!(c.relay.app_id.as_ref().is_none_or(|a| a.len() <= 255));
            for name in vars.keys() {
                if let Some(Parsed::Duration(d)) = field(c, name) {
                    prop_assert!(d <= Duration::from_secs(100 * 31_557_600), "{name}: {d:?}");
                }
            }
            Ok(())
        }

        proptest! {
            /// Any values of any variables: no panic, and every error starts with the
            /// variable it is about and names one that was set (or is a required one that
            /// was not).
            #[test]
            fn any_environment_is_read_or_every_error_names_its_variable(
                vars in proptest::collection::btree_map(prop::sample::select(VARS.to_vec()), value(), 0..12),
                needs_broker in any::<bool>(),
            ) {
                let (result, asked) = read_recording(&vars, needs_broker);
                prop_assert!(asked.iter().all(|a| VARS.contains(&a.as_str())), "{asked:?} reads a variable not in VARS");
                let errors = match result {
                    Ok(c) => return check_usable(&c, &vars),
                    Err(errors) => errors,
                };
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    let (about, _) = e.split_once(": ").unwrap_or(("", ""));
                    prop_assert!(VARS.contains(&about), "{e:?} does not start with a variable");
                    let names_one_set = vars.keys().any(|name| e.contains(name));
                    let required = e.starts_with("DATABASE_URL: required")
                        || (needs_broker && e.starts_with("AMQP_URL: required"));
                    prop_assert!(names_one_set || required, "{e:?} names none of {:?}", vars.keys());
                }
            }

            /// One variable of any value beside a valid base: read, or refused naming it.
            #[test]
            fn any_value_of_one_variable_is_read_or_refused_naming_it(
                name in prop::sample::select(VARS.to_vec()),
                value in value(),
            ) {
                let mut vars = BTreeMap::from([("DATABASE_URL", "postgres://h/db".to_owned()), ("AMQP_URL", "amqp://h".into())]);
                vars.insert(name, value);
                let (result, _) = read_recording(&vars, true);
                match result {
                    Ok(c) => check_usable(&c, &vars)?,
                    Err(errors) => prop_assert!(errors.iter().all(|e| e.contains(name)), "{errors:?} should name {name}"),
                }
            }

            /// Well-formed values parse to the value given.
            #[test]
            fn well_formed_values_parse_to_the_value_given(knobs in well_formed(), needs_broker in any::<bool>()) {
                let given: Vec<_> = knobs.into_iter().flatten().collect();
                let mut vars: BTreeMap<&str, String> = given.iter().map(|(n, t, _)| (*n, t.clone())).collect();
                vars.insert("DATABASE_URL", "postgres://u@h/db".into());
                if needs_broker {
                    vars.entry("AMQP_URL").or_insert_with(|| "amqp://h".into());
                }
                let config = match read_recording(&vars, needs_broker).0 {
                    Ok(config) => config,
                    Err(errors) => return Err(TestCaseError::fail(format!("{vars:?}: {errors:?}"))),
                };
                for (name, _, parsed) in &given {
                    let got = field(&config, name);
                    prop_assert_eq!(got.as_ref(), Some(parsed), "{}", name);
                }
            }
        }
    }
}
