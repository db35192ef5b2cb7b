//! The contract's AMQP mapping: a claimed row becomes properties and headers.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::message::OutboxRow;

/// The largest AMQP short string (exchange, routing key, `type`, `message-id`, `app_id`):
/// lapin's `ShortString::from` panics past it.
const SHORT_MAX: usize = 255;

/// What a content header carries besides the headers table, at most: its frame's own
/// bytes, the fixed fields, and the contract's properties with their longest values
/// (timestamp, delivery mode, `message-id`, `type` and `app_id`, content type).
const HEADER_FRAME_OVERHEAD: usize =
    8 + 14 + 8 + 1 + 3 * (1 + SHORT_MAX) + (1 + "application/json".len()) + 4;

/// The properties of the contract (section 2), or why the row cannot be published as written:
/// among other things, they must fit in one frame of `frame_max` bytes (a content header is
/// never split, and a broker ends the connection over one that does not fit).
pub(crate) fn properties(
    row: &OutboxRow,
    app_id: Option<&str>,
    frame_max: usize,
) -> Result<BasicProperties, String> {
    for (what, value) in [
        ("exchange", Some(row.exchange.as_str())),
        ("routing_key", Some(row.routing_key.as_str())),
        ("message_type", row.message_type.as_deref()),
        ("message_id", Some(row.message_id.as_str())),
        ("app_id (OUTBOX_APP_ID)", app_id),
    ] {
        if value.is_some_and(|v| v.len() > SHORT_MAX) {
            return Err(format!("{what} is longer than {SHORT_MAX} bytes"));
        }
    }
    let mut props = BasicProperties::default()
        .with_message_id(short(&row.message_id))
        .with_content_type(short("application/json"))
        .with_delivery_mode(2)
        .with_timestamp(row.created_at.max(0.0) as u64);
    if let Some(t) = &row.message_type {
        props = props.with_type(short(t));
    }
    if let Some(app) = app_id {
        props = props.with_app_id(short(app));
    }
    if row.headers != "{}" {
        let table = headers(&row.headers)?;
        let size = encoded_size(&table) + HEADER_FRAME_OVERHEAD;
        if size > frame_max {
            return Err(format!(
                "the headers take {size} bytes, more than one AMQP frame carries (frame_max {frame_max})"
            ));
        }
        props = props.with_headers(table);
    }
    Ok(props)
}

/// The bytes a field table of the types [`headers`] makes takes on the wire.
fn encoded_size(table: &FieldTable) -> usize {
    let value = |v: &AMQPValue| match v {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::Boolean(_) => 1,
        _ => 8,
    };
    let entries: usize = table
        .inner()
        .iter()
        .map(|(name, v)| 1 + name.as_str().len() + 1 + value(v))
        .sum();
    4 + entries
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

/// A flat JSON object of string, number and bool values as an AMQP field table. A number is
/// carried exactly or refused: an integer (no fraction, no exponent) as a signed 64-bit
/// integer, any other number as the double nearest to it.
pub(crate) fn headers(json: &str) -> Result<FieldTable, String> {
    let object: BTreeMap<String, &RawValue> =
        serde_json::from_str(json).map_err(|e| format!("headers are not a JSON object: {e}"))?;
    let mut table = FieldTable::default();
    for (name, raw) in object {
        if name.len() > SHORT_MAX {
            return Err(format!("header name longer than {SHORT_MAX} bytes"));
        }
        let value = header_value(raw.get()).map_err(|why| format!("header {name:?}: {why}"))?;
        table.insert(ShortString::from(name), value);
    }
    Ok(table)
}

/// One header's value, from its JSON text.
fn header_value(text: &str) -> Result<AMQPValue, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(match value {
        Value::String(s) => AMQPValue::LongString(LongString::from(s)),
        Value::Bool(b) => AMQPValue::Boolean(b),
        // serde_json reads an integer past u64 as the nearest double: the text says which
        // it was.
        Value::Number(_) if !text.contains(['.', 'e', 'E']) => match text.parse::<i64>() {
            Ok(i) => AMQPValue::LongLongInt(i),
            Err(_) => {
                return Err(format!(
                    "{text} is outside the signed 64-bit range AMQP carries (write it as a string)"
                ));
            }
        },
        // Rust's parser rounds correctly; serde_json's, by default, only nearly.
        Value::Number(_) => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => AMQPValue::Double(f),
            _ => return Err(format!("{text} is outside the range of a double")),
        },
        Value::Null | Value::Array(_) | Value::Object(_) => {
            return Err("only string, number and bool values are allowed".into());
        }
    })
}

#[cfg(test)]
#[path = "../../tests/common/mapping.rs"]
mod mapping;

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::basic::gen_properties;
    use mapping::{Headers, Target, table_to_json};
    use proptest::prelude::*;

    #[test]
    fn flat_headers_map_to_amqp_types() {
        let t = headers(r#"{"s":"x","i":-3,"f":1.5,"b":true}"#).unwrap();
        let m = t.inner();
        assert_eq!(m.get("s"), Some(&AMQPValue::LongString("x".into())));
        assert_eq!(m.get("i"), Some(&AMQPValue::LongLongInt(-3)));
        assert_eq!(m.get("f"), Some(&AMQPValue::Double(1.5)));
        assert_eq!(m.get("b"), Some(&AMQPValue::Boolean(true)));
    }

    #[test]
    fn integers_past_i64_are_refused_and_floats_kept() {
        let err = headers(r#"{"big":18446744073709551615}"#).unwrap_err();
        assert!(err.contains("big") && err.contains("64-bit"), "{err}");
        let t = headers(r#"{"f":1e300}"#).unwrap();
        assert_eq!(t.inner().get("f"), Some(&AMQPValue::Double(1e300)));
    }

    #[test]
    fn the_encoded_size_of_headers_is_counted_exactly() {
        let t = headers(r#"{"s":"xyz","i":1,"b":true}"#).unwrap();
        // table length, then per entry: name length, name, type, value
        assert_eq!(
            encoded_size(&t),
            4 + (1 + 1 + 1 + 4 + 3) + (1 + 1 + 1 + 8) + (1 + 1 + 1 + 1)
        );
    }

    #[test]
    fn nested_headers_are_refused_with_the_name() {
        let err = headers(r#"{"deep":{"a":1}}"#).unwrap_err();
        assert!(err.contains("deep"), "{err}");
        assert!(headers("[1]").is_err());
    }

    /// A row's `headers` text, with the model it was written from, if any: arbitrary text,
    /// JSON that is not an object, and truncated objects too.
    fn headers_text() -> impl Strategy<Value = (String, Option<Headers>)> {
        prop_oneof![
            6 => mapping::headers(Target::Encoder).prop_map(|h| (h.text(), Some(h))),
            1 => any::<String>().prop_map(|t| (t, None)),
            1 => mapping::json(Target::Encoder).prop_map(|v| (v.to_string(), None)),
            1 => (mapping::headers(Target::Encoder), any::<prop::sample::Index>()).prop_map(|(h, cut)| {
                let text = h.text();
                let cut = cut.index(text.len());
                (text.get(..cut).unwrap_or("{").to_owned(), None)
            }),
        ]
    }

    fn row() -> impl Strategy<Value = (OutboxRow, Option<Headers>)> {
        let short = || mapping::short_string(Target::Encoder);
        let created_at = prop_oneof![0.0..4e9f64, any::<f64>()];
        (
            short(),
            short(),
            proptest::option::of(short()),
            short(),
            headers_text(),
            created_at,
        )
            .prop_map(
                |(
                    exchange,
                    routing_key,
                    message_type,
                    message_id,
                    (headers, model),
                    created_at,
                )| {
                    let row = OutboxRow {
                        id: 1,
                        message_id,
                        exchange,
                        routing_key,
                        ordering_key: None,
                        message_type,
                        payload: "{}".into(),
                        headers,
                        created_at,
                        attempts: 0,
                        previous: None,
                    };
                    (row, model)
                },
            )
    }

    /// The content header frame lapin sends for `props`: frame header (7 bytes), class,
    /// weight and body size (12), the properties, frame end (1).
    fn frame_bytes(props: &BasicProperties) -> usize {
        let encoded = cookie_factory::gen_simple(gen_properties(props), Vec::new()).unwrap();
        7 + 12 + encoded.len() + 1
    }

    /// What the contract says the properties are, headers aside.
    fn check_properties(props: &BasicProperties, row: &OutboxRow, app_id: Option<&str>) {
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.to_string());
        assert_eq!(
            text(props.message_id()).as_deref(),
            Some(row.message_id.as_str())
        );
        assert_eq!(
            text(props.content_type()).as_deref(),
            Some("application/json")
        );
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(text(props.kind()), row.message_type);
        assert_eq!(text(props.app_id()).as_deref(), app_id);
        if (0.0..4e9).contains(&row.created_at) {
            assert_eq!(*props.timestamp(), Some(row.created_at as u64));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Any row either maps to the contract's properties, in one frame, with headers that
        /// convert back to the JSON written, or is refused saying why; never a panic.
        #[test]
        fn any_row_maps_faithfully_or_is_refused(
            (row, model) in row(),
            app_id in proptest::option::of(mapping::short_string(Target::Encoder)),
            frame_max in prop_oneof![4096..=65536usize, Just(usize::MAX)],
        ) {
            let result = properties(&row, app_id.as_deref(), frame_max);
            let too_long: Vec<&str> = [
                ("exchange", Some(row.exchange.as_str())),
                ("routing_key", Some(row.routing_key.as_str())),
                ("message_type", row.message_type.as_deref()),
                ("message_id", Some(row.message_id.as_str())),
                ("app_id", app_id.as_deref()),
            ]
            .into_iter()
            .filter(|(_, v)| v.is_some_and(|v| v.len() > mapping::SHORT_MAX))
            .map(|(what, _)| what)
            .collect();
            if !too_long.is_empty() {
                let err = result.expect_err("a short string past 255 bytes");
                prop_assert!(too_long.iter().any(|w| err.contains(w)), "{err} names none of {too_long:?}");
                return Ok(());
            }
            let expected = match &model {
                Some(model) => model.expected(),
                None if serde_json::from_str::<serde_json::Map<String, Value>>(&row.headers).is_err() => {
                    let err = result.expect_err("headers that are not a JSON object");
                    prop_assert!(err.contains("not a JSON object"), "{err}");
                    return Ok(());
                }
                // Arbitrary text that happens to be an object: it must only not panic.
                None => return Ok(()),
            };
            match (expected, result) {
                (Err(offences), result) => {
                    let err = result.expect_err("headers that cannot be carried");
                    prop_assert!(offences.iter().any(|o| err.contains(o.as_str())), "{err} names none of {offences:?}");
                }
                (Ok(json), Ok(props)) => {
                    check_properties(&props, &row, app_id.as_deref());
                    prop_assert_eq!(table_to_json(props.headers().as_ref()), json);
                    prop_assert!(frame_bytes(&props) <= frame_max, "{} bytes, frame_max {frame_max}", frame_bytes(&props));
                }
                (Ok(json), Err(err)) => {
                    // Refused for its size: the frame, with these properties, must not fit
                    // by more than the other properties' longest values could add.
                    prop_assert!(err.contains("more than one AMQP frame carries"), "{err}");
                    let table = headers(&row.headers).unwrap();
                    prop_assert_eq!(table_to_json(Some(&table)), json);
                    let props = properties(&row, app_id.as_deref(), usize::MAX).unwrap().with_headers(table);
                    let slack = 3 * (1 + SHORT_MAX) + 1 + 36;
                    prop_assert!(frame_bytes(&props) + slack > frame_max, "{} bytes refused, frame_max {frame_max}", frame_bytes(&props));
                }
            }
        }
    }
}
