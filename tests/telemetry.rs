//! Traces through the outbox, checked against a real OTLP/HTTP receiver that decodes the
//! exported spans with the official protobuf definitions: the relay's PRODUCER span per row
//! in the row's trace, the inbox's CONSUMER span continuing it with the handler inside, the
//! handler's outgoing rows joining it, and the demo's one trace across both services. Also
//! the JSON log format.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::otlp::{Receiver, Span, attr, hex, is, links_to, new_traceparent};
use common::*;
use lapin::types::AMQPValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use outbox::inbox::{ConsumerConfig, Database, Handler, HandlerError, Incoming};
use outbox::telemetry::Telemetry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// This test binary's receiver, and the in-process spans' exporter to it (set up once: the
/// tracing subscriber and the tracer provider are process-wide).
fn receiver() -> &'static Receiver {
    static RECEIVER: OnceLock<(Receiver, Telemetry)> = OnceLock::new();
    let (receiver, _) = RECEIVER.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let receiver = Receiver::start();
        let telemetry = Telemetry::to_url(&receiver.traces_url(), "telemetry-test").unwrap();
        tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(telemetry.layer())
            .init();
        (receiver, telemetry)
    });
    receiver
}

/// A relay child process that exports its spans to the receiver every 100 ms.
fn relay_exporting(db: &Db, env: &[(&str, &str)]) -> Relay {
    let endpoint = receiver().endpoint.clone();
    let mut all = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    all.extend_from_slice(env);
    Relay::start(&db.url, &db.table, &all)
}

fn producer_of<'a>(spans: &'a [Span], message_id: &str) -> Option<&'a Span> {
    spans.iter().find(|s| {
        is(s, SpanKind::Producer) && attr(s, "messaging.message.id").as_deref() == Some(message_id)
    })
}

fn with_traceparent(row: Row, traceparent: &str) -> Row {
    row.headers(json!({ "traceparent": traceparent }))
}

on_both_backends! {
    /// Each row's publish is a PRODUCER span in the row's own trace, a child of the span
    /// that wrote the row and linked to it, with the messaging attributes and the confirm's
    /// outcome; the message still carries the row's `traceparent` unchanged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_exports_a_producer_span_per_row_in_the_rows_trace(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let _relay = relay_exporting(&db, &[("OUTBOX_MAX_ATTEMPTS", "1")]);
        let (trace, parent, traceparent) = new_traceparent();
        let routed = db
            .insert_row(&with_traceparent(Row::new(&queue.name, json!({})), &traceparent))
            .await;
        let (lost_trace, _, lost_traceparent) = new_traceparent();
        let nowhere = unique("nowhere");
        let lost = db
            .insert_row(&with_traceparent(Row::new(&nowhere, json!({})), &lost_traceparent))
            .await;

        let spans = receiver()
            .wait_for_trace(&trace, "the routed row's publish span", Duration::from_secs(20), |s| {
                producer_of(s, &routed).is_some()
            })
            .await;
        let span = producer_of(&spans, &routed).unwrap();
        assert_eq!(hex(&span.parent_span_id), parent);
        assert!(links_to(span, &trace, &parent), "{span:?}");
        assert_eq!(span.name, "publish amq.default");
        assert_eq!(attr(span, "messaging.system").as_deref(), Some("rabbitmq"));
        assert_eq!(attr(span, "messaging.destination.name").as_deref(), Some("amq.default"));
        assert_eq!(
            attr(span, "messaging.rabbitmq.destination.routing_key").as_deref(),
            Some(queue.name.as_str())
        );
        assert_eq!(attr(span, "outbox.confirm").as_deref(), Some("ack"));
        assert_ne!(span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));

        let spans = receiver()
            .wait_for_trace(&lost_trace, "the unroutable row's publish span", Duration::from_secs(20), |s| {
                producer_of(s, &lost).is_some()
            })
            .await;
        let span = producer_of(&spans, &lost).unwrap();
        assert_eq!(attr(span, "outbox.confirm").as_deref(), Some("unroutable"));
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));

        let got = queue.wait_for(1, Duration::from_secs(10)).await;
        let headers = got[0].properties.headers().clone().unwrap();
        assert_eq!(
            headers.inner().get("traceparent"),
            Some(&AMQPValue::LongString(traceparent.as_str().into()))
        );
    }

    /// The inbox's CONSUMER span is a child of the message's trace and links to it; the
    /// handler runs inside it, and the row it enqueues carries the handler's context, so the
    /// reply's publish joins the same trace.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_inbox_continues_the_trace_and_the_handlers_rows_join_it(backend: Backend) {
        let db = Db::new(backend).await;
        let replies = TestQueue::new().await;
        let queue = unique("traced");
        let mut config = ConsumerConfig::new(vec![amqp_url()], "traced-consumer", queue.clone());
        config.queue_ttl = Some(Duration::from_secs(600));
        let stop = CancellationToken::new();
        let handler = Replies { to: replies.name.clone() };
        let consumer = db.pool.consume::<serde_json::Value, _>(config, handler, stop.clone());
        let _relay = relay_exporting(&db, &[]);
        // The consumer declares its queue; a row published before would be unroutable.
        eventually("the consumer's queue", Duration::from_secs(20), || queue_exists(&queue)).await;

        let (trace, parent, traceparent) = new_traceparent();
        let asked = db
            .insert_row(&with_traceparent(Row::new(&queue, json!({"ask": 1})), &traceparent))
            .await;
        let reply = replies.wait_for(1, Duration::from_secs(20)).await;
        let replied = reply[0].message_id.clone();
        let spans = receiver()
            .wait_for_trace(&trace, "publish, process, handler and reply spans", Duration::from_secs(20), |s| {
                producer_of(s, &replied).is_some()
                    && s.iter().any(|s| is(s, SpanKind::Consumer))
                    && s.iter().any(|s| s.name == "compose reply")
            })
            .await;
        let process = spans.iter().find(|s| is(s, SpanKind::Consumer)).expect("a consumer span");
        assert_eq!(hex(&process.parent_span_id), parent, "{process:?}");
        assert!(links_to(process, &trace, &parent), "{process:?}");
        assert_eq!(process.name, "process traced-consumer");
        assert_eq!(attr(process, "messaging.message.id").as_deref(), Some(asked.as_str()));
        let work = spans.iter().find(|s| s.name == "compose reply").expect("the handler's span");
        assert_eq!(work.parent_span_id, process.span_id);
        // The reply was enqueued inside the handler's span: its trace goes on from there.
        let headers = reply[0].properties.headers().clone().unwrap();
        let Some(AMQPValue::LongString(sent)) = headers.inner().get("traceparent") else {
            panic!("the reply has no traceparent: {headers:?}");
        };
        assert_eq!(sent.to_string(), format!("00-{trace}-{}-01", hex(&work.span_id)));
        let reply_publish = producer_of(&spans, &replied).unwrap();
        assert_eq!(reply_publish.parent_span_id, work.span_id);
        stop.cancel();
        consumer.await.unwrap();
    }
}

/// Answers each message with a row to `to`, enqueued inside a span of its own.
#[derive(Clone)]
struct Replies {
    to: String,
}

impl<DB: Database> Handler<serde_json::Value, DB> for Replies
where
    DB::Connection: HandlerTx,
{
    async fn handle(
        &self,
        tx: &mut DB::Connection,
        msg: &Incoming<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        use tracing::Instrument;
        let reply = outbox::Message::new(self.to.as_str(), &json!({"for": msg.message_id}))?;
        outbox::enqueue(tx, &reply)
            .instrument(tracing::info_span!("compose reply"))
            .await?;
        Ok(())
    }
}

/// The demo's saga is one trace per order: its placement, the order event's publish, the
/// payment service's processing and reply, and the order service's processing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_one_trace_from_the_order_through_the_payment_to_the_order_update() {
    let orders = Db::new(Backend::Postgres).await;
    let payments = Db::new(Backend::Mysql).await;
    let out = std::process::Command::new(demo_bin())
        .args(["--orders", "3", "--json", "--timeout", "60"])
        .env("ORDERS_DATABASE_URL", &orders.url)
        .env("PAYMENTS_DATABASE_URL", &payments.url)
        .env("AMQP_URL", amqp_url())
        .env("DEMO_PREFIX", unique("traced"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver().endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output()
        .unwrap();
    assert!(out.status.success(), "demo failed: {out:?}");
    let all = receiver().all();
    let placements: Vec<&Span> = all.iter().filter(|s| s.name == "place order").collect();
    assert_eq!(placements.len(), 3, "one root span per order");
    for placed in placements {
        let trace: Vec<&Span> = all
            .iter()
            .filter(|s| s.trace_id == placed.trace_id)
            .collect();
        let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
        let child_of = |parent: &Span, kind: SpanKind, name: &str| {
            trace
                .iter()
                .find(|s| {
                    is(s, kind) && s.parent_span_id == parent.span_id && s.name.starts_with(name)
                })
                .copied()
        };
        // The message carries its row's context unchanged: the publish and the processing
        // are both children of the span that wrote the row.
        let missing = || panic!("{names:?}");
        child_of(placed, SpanKind::Producer, "publish").unwrap_or_else(missing);
        let charged = child_of(placed, SpanKind::Consumer, "process payment consumer")
            .unwrap_or_else(missing);
        child_of(charged, SpanKind::Producer, "publish").unwrap_or_else(missing);
        child_of(charged, SpanKind::Consumer, "process order consumer").unwrap_or_else(missing);
    }
}

/// `OUTBOX_LOG_FORMAT=json`: every line the relay logs is one JSON object with a timestamp,
/// level, target, message and the event's fields; a bad value is named (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_events_fields() {
    let db = Db::new(Backend::Postgres).await;
    let mut relay = Relay::start(&db.url, &db.table, &[("OUTBOX_LOG_FORMAT", "json")]);
    eventually("the relay to lead", Duration::from_secs(20), || async {
        relay.is_leader().await
    })
    .await;
    assert!(relay.terminate().success());
    let log = relay.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
    }
    let leading = lines
        .iter()
        .find(|l| l["message"] == "leading: this relay publishes the table")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(leading["level"], "INFO");
    assert_eq!(leading["target"], "outbox::relay");
    assert!(leading["term"].is_i64(), "the event's field: {leading}");

    let bad = outbox_bin()
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .env("OUTBOX_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr),
        "outbox: bad configuration: OUTBOX_LOG_FORMAT: expected text or json, got \"yaml\"\n"
    );
}
