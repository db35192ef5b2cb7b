//! The contract's AMQP mapping (section 2) through a real publish, on both backends. Rows
//! generated from the headers model of `common/mapping.rs` (any Unicode in routing keys,
//! types, header names and values; integers of every size, doubles, nested values; keys and
//! names around 255 bytes; exchanges that do not exist) are inserted as a service writes
//! them. Every row the model says can be carried arrives with exactly the contract's
//! properties, and headers that convert back to the JSON written; every other row is dead
//! with a last_error naming what is wrong; nothing is lost and the relay never panics.
//!
//! The rows come from a fixed seed; set `OUTBOX_MAPPING_SEED` (a number) to try others.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::mapping::{self, Headers, Target, table_to_json};
use common::*;
use lapin::ExchangeKind;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::json;

const ROWS: usize = 48;
const APP_ID: &str = "mapping-tést";

/// Where a generated row is sent.
#[derive(Debug, Clone)]
enum Exchange {
    /// The test's fanout exchange: any routing key reaches the test's queue.
    Fanout,
    /// An exchange that does not exist (or whose name is too long to).
    Missing(String),
}

/// A generated row, and the model of its headers.
#[derive(Debug, Clone)]
struct Case {
    exchange: Exchange,
    routing_key: String,
    message_type: Option<String>,
    headers: Headers,
}

impl Case {
    /// What a refusal may name, one fragment per problem; empty if the row must arrive.
    fn problems(&self) -> Vec<String> {
        let mut problems = match self.headers.expected() {
            Ok(_) => Vec::new(),
            Err(offences) => offences,
        };
        let long = |s: &str| s.len() > mapping::SHORT_MAX;
        if long(&self.routing_key) {
            problems.push("routing_key".into());
        }
        if self.message_type.as_deref().is_some_and(long) {
            problems.push("message_type".into());
        }
        if let Exchange::Missing(_) = self.exchange {
            problems.push("exchange".into());
        }
        problems
    }

    fn row(&self, fanout: &str, i: usize) -> Row {
        let exchange = match &self.exchange {
            Exchange::Fanout => fanout,
            Exchange::Missing(name) => name,
        };
        let mut row = Row::new(&self.routing_key, json!({ "i": i }))
            .exchange(exchange)
            .headers_text(&self.headers.text());
        row.message_type = self.message_type.clone();
        row
    }
}

fn case() -> impl Strategy<Value = Case> {
    let short = || mapping::short_string(Target::Stored);
    let exchange = prop_oneof![
        8 => Just(Exchange::Fanout),
        1 => mapping::text(Target::Stored, 0..20).prop_map(|t| Exchange::Missing(format!("missing-{t}"))),
        1 => "[éü]{128,200}".prop_map(Exchange::Missing),
    ];
    let headers = mapping::headers(Target::Stored);
    (exchange, short(), proptest::option::of(short()), headers).prop_map(
        |(exchange, routing_key, message_type, headers)| Case {
            exchange,
            routing_key,
            message_type,
            headers,
        },
    )
}

/// `ROWS` cases from the seed.
fn cases() -> Vec<Case> {
    let seed: u64 = std::env::var("OUTBOX_MAPPING_SEED")
        .ok()
        .map(|s| s.parse().expect("OUTBOX_MAPPING_SEED is a number"))
        .unwrap_or(12);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let strategy = proptest::collection::vec(case(), ROWS);
    strategy.new_tree(&mut runner).unwrap().current()
}

/// The message arrived as the contract maps the row: its properties, and headers that
/// convert back to the JSON the row had.
fn check_delivered(m: &Received, case: &Case, i: usize, created: f64) {
    let p = &m.properties;
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.to_string());
    let what = format!("row {i} ({case:?})");
    assert_eq!(m.routing_key, case.routing_key, "{what}");
    assert_eq!(m.body, json!({ "i": i }), "{what}");
    assert_eq!(
        text(p.content_type()).as_deref(),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(*p.delivery_mode(), Some(2), "{what}");
    assert_eq!(*p.timestamp(), Some(created as u64), "{what}");
    assert_eq!(text(p.kind()), case.message_type, "{what}");
    assert_eq!(text(p.app_id()).as_deref(), Some(APP_ID), "{what}");
    let expected = case.headers.expected().unwrap();
    assert_eq!(table_to_json(p.headers().as_ref()), expected, "{what}");
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generated_rows_arrive_as_the_contract_maps_them_or_die_saying_why(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let fanout = queue.exchange_of(ExchangeKind::Fanout).await;
        queue.bind(&fanout, "").await;
        let cases = cases();
        let rows: Vec<Row> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| c.row(&fanout, i))
            .collect();
        let ids = db.insert_rows(&rows).await;
        let mut created = Vec::new();
        for id in &ids {
            created.push(db.created_epoch(id).await);
        }
        let (good, bad): (Vec<usize>, Vec<usize>) =
            (0..ROWS).partition(|&i| cases[i].problems().is_empty());
        println!("{} rows to arrive, {} to die", good.len(), bad.len());

        let mut relay = Relay::start(
            &db.url,
            &db.table,
            &[("OUTBOX_MAX_ATTEMPTS", "1"), ("OUTBOX_APP_ID", APP_ID)],
        );
        let dead = "state = 'dead'";
        eventually(
            "every row delivered or dead",
            Duration::from_secs(60),
            || async {
                db.count("1 = 1").await == db.count(dead).await && queue.count() >= good.len()
            },
        )
        .await;

        let received: BTreeMap<String, Received> = queue
            .received()
            .into_iter()
            .map(|m| (m.message_id.clone(), m))
            .collect();
        assert_eq!(queue.count(), good.len(), "one delivery per row");
        for &i in &good {
            let m = received
                .get(&ids[i])
                .unwrap_or_else(|| panic!("row {i} ({:?}) did not arrive", cases[i]));
            check_delivered(m, &cases[i], i, created[i]);
        }
        for &i in &bad {
            let sql = format!(
                "SELECT last_error FROM outbox WHERE message_id = '{}' AND {dead}",
                ids[i]
            );
            let error = db.strings(&sql).await.pop();
            let error = error.unwrap_or_else(|| panic!("row {i} ({:?}) is not dead", cases[i]));
            let problems = cases[i].problems();
            assert!(
                problems.iter().any(|p| error.contains(p.as_str())),
                "row {i}: {error:?} names none of {problems:?}"
            );
        }
        assert_eq!(
            relay.child.try_wait().unwrap(),
            None,
            "the relay exited: {}",
            relay.log_text()
        );
        assert!(
            !relay.log_text().contains("panicked"),
            "{}",
            relay.log_text()
        );
    }
}
