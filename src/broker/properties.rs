//! The contract's AMQP mapping: a claimed row becomes properties and headers.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;

use crate::message::OutboxRow;

/// The largest AMQP short string (exchange, routing key, `type`).
const SHORT_MAX: usize = 255;

/// What a content header carries besides the headers table, at most: its frame's own
/// bytes, the fixed fields, and the contract's properties with their longest values.
const HEADER_FRAME_OVERHEAD: usize = 8 + 14 + 8 + 1 + 3 * (1 + SHORT_MAX) + (1 + 36) + 4;

/// The properties of the contract (section 2), or why the row cannot be published as written:
/// among other things, they must fit in one frame of `frame_max` bytes (a content header is
/// never split, and a broker ends the connection over one that does not fit).
pub(crate) fn properties(
    row: &OutboxRow,
    app_id: Option<&str>,
    frame_max: usize,
) -> Result<BasicProperties, String> {
    for (what, value) in [
        ("exchange", Some(&row.exchange)),
        ("routing_key", Some(&row.routing_key)),
        ("message_type", row.message_type.as_ref()),
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

/// A flat JSON object of string, number and bool values as an AMQP field table.
pub(crate) fn headers(json: &str) -> Result<FieldTable, String> {
    let object: serde_json::Map<String, Value> =
        serde_json::from_str(json).map_err(|e| format!("headers are not a JSON object: {e}"))?;
    let mut table = FieldTable::default();
    for (name, value) in object {
        if name.len() > SHORT_MAX {
            return Err(format!("header name longer than {SHORT_MAX} bytes"));
        }
        let value = match value {
            Value::String(s) => AMQPValue::LongString(LongString::from(s)),
            Value::Bool(b) => AMQPValue::Boolean(b),
            Value::Number(n) => match (n.as_i64(), n.is_f64()) {
                (Some(i), _) => AMQPValue::LongLongInt(i),
                (None, true) => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
                (None, false) => {
                    return Err(format!(
                        "header {name:?}: {n} is outside the signed 64-bit range AMQP carries"
                    ));
                }
            },
            Value::Null | Value::Array(_) | Value::Object(_) => {
                return Err(format!(
                    "header {name:?}: only string, number and bool values are allowed"
                ));
            }
        };
        table.insert(ShortString::from(name), value);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
