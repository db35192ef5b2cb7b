//! The contract's headers mapping (section 2) as a proptest model: headers a service might
//! write, generated as a list of entries, written as JSON text, and what the relay must
//! publish for them (read back from the AMQP table by the contract's inverse) or refuse.
//! Shared by the mapping's unit test (`src/broker/properties.rs` includes this file) and its
//! round trip through a real publish (`tests/mapping.rs`), so it uses only proptest,
//! serde_json and lapin.
#![allow(dead_code)]

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

/// The largest AMQP short string: a longer header name is refused.
pub const SHORT_MAX: usize = 255;

/// One header value as a service might write it.
#[derive(Debug, Clone)]
pub enum Written {
    Str(String),
    Bool(bool),
    /// An integer literal of any length: carried if it fits a signed 64-bit integer.
    Int(String),
    /// A number with a fraction or an exponent: carried as a double if it is in range.
    Float(String),
    /// null, an array or an object: never carried.
    Other(Value),
}

impl Written {
    fn text(&self) -> String {
        match self {
            Written::Str(s) => Value::from(s.as_str()).to_string(),
            Written::Bool(b) => b.to_string(),
            Written::Int(t) | Written::Float(t) => t.clone(),
            Written::Other(v) => v.to_string(),
        }
    }

    /// The JSON value the contract carries, or `None` if it cannot be carried.
    fn carried(&self) -> Option<Value> {
        match self {
            Written::Str(s) => Some(Value::from(s.as_str())),
            Written::Bool(b) => Some(Value::from(*b)),
            Written::Int(t) => t.parse::<i64>().ok().map(Value::from),
            Written::Float(t) => t
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(Number::from_f64)
                .map(Value::Number),
            Written::Other(_) => None,
        }
    }
}

/// A row's headers: entries in the order written (a repeated name: the last one counts, as
/// in PostgreSQL's `jsonb` and in serde_json).
#[derive(Debug, Clone)]
pub struct Headers(pub Vec<(String, Written)>);

impl Headers {
    /// The JSON object text.
    pub fn text(&self) -> String {
        let entries: Vec<String> = self
            .0
            .iter()
            .map(|(name, value)| format!("{}:{}", Value::from(name.as_str()), value.text()))
            .collect();
        format!("{{{}}}", entries.join(","))
    }

    /// What the headers table must convert back to, or, for headers that cannot be carried,
    /// what the refusal may name (one fragment per offending entry).
    pub fn expected(&self) -> Result<Map<String, Value>, Vec<String>> {
        let last: BTreeMap<&String, &Written> = self.0.iter().map(|(n, w)| (n, w)).collect();
        let mut carried = Map::new();
        let mut offences = Vec::new();
        for (name, written) in last {
            match written.carried() {
                _ if name.len() > SHORT_MAX => offences.push("header name longer than".into()),
                Some(value) => {
                    carried.insert(name.clone(), value);
                }
                None => offences.push(format!("header {name:?}")),
            }
        }
        if offences.is_empty() {
            Ok(carried)
        } else {
            Err(offences)
        }
    }
}

/// The contract's inverse: the JSON object an AMQP headers table (absent: empty) stands for.
/// Panics on a type the contract never maps to.
pub fn table_to_json(table: Option<&FieldTable>) -> Map<String, Value> {
    let Some(table) = table else {
        return Map::new();
    };
    let value = |name: &str, v: &AMQPValue| match v {
        AMQPValue::LongString(s) => Value::from(String::from_utf8(s.as_bytes().to_vec()).unwrap()),
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Double(f) => Value::Number(Number::from_f64(*f).expect("a finite double")),
        other => panic!("header {name:?}: {other:?} is not a type the contract maps to"),
    };
    table
        .inner()
        .iter()
        .map(|(name, v)| (name.to_string(), value(name.as_str(), v)))
        .collect()
}

/// Where generated text goes: `Stored` text is what every database keeps as written (no NUL,
/// which PostgreSQL refuses; no number PostgreSQL's `jsonb` would print as an integer) and
/// small enough for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Encoder,
    Stored,
}

/// Text of any Unicode (control characters too) of `chars` characters.
pub fn text(target: Target, chars: std::ops::Range<usize>) -> BoxedStrategy<String> {
    let c = any::<char>().prop_map(move |c| match (c, target) {
        ('\0', Target::Stored) => '0',
        _ => c,
    });
    proptest::collection::vec(c, chars)
        .prop_map(String::from_iter)
        .boxed()
}

/// A short string, or one around the 255-byte limit: ASCII (stored: at most the 255
/// characters of MySQL's `VARCHAR(255)`), or of wide characters.
pub fn short_string(target: Target) -> BoxedStrategy<String> {
    let ascii = match target {
        Target::Encoder => "[a-z]{250,260}",
        Target::Stored => "[a-z]{250,255}",
    };
    prop_oneof![
        4 => text(target, 0..16),
        1 => ascii,
        1 => text(target, 60..70),
    ]
    .boxed()
}

fn written(target: Target) -> BoxedStrategy<Written> {
    let float = match target {
        Target::Encoder => prop_oneof![
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Value::from(f).to_string()),
            "-?[0-9]\\.[0-9]{1,20}[eE][-+]?[0-9]{1,3}",
        ]
        .boxed(),
        Target::Stored => (-1e12..1e12f64)
            .prop_map(|f| Value::from(f).to_string())
            .prop_filter("plain decimal", |t| t.contains('.') && !t.contains('e'))
            .boxed(),
    };
    prop_oneof![
        4 => text(target, 0..40).prop_map(Written::Str),
        2 => any::<bool>().prop_map(Written::Bool),
        3 => any::<i64>().prop_map(|i| Written::Int(i.to_string())),
        1 => prop_oneof![
            any::<u64>().prop_map(|u| u.to_string()),
            "-?[1-9][0-9]{18,40}",
        ]
        .prop_map(Written::Int),
        2 => float.prop_map(Written::Float),
        1 => json(target).prop_map(|v| match v {
            Value::Array(_) | Value::Object(_) | Value::Null => Written::Other(v),
            flat => Written::Other(Value::Array(vec![flat])),
        }),
    ]
    .boxed()
}

/// Arbitrary JSON: nested arrays and objects of every kind of value.
pub fn json(target: Target) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6..1e6f64).prop_map(Value::from),
        text(target, 0..20).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(text(target, 0..8), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Headers a service might write: names from a small pool (so some repeat) or arbitrary;
/// for the encoder, up to 40 entries (more than a small frame carries).
pub fn headers(target: Target) -> BoxedStrategy<Headers> {
    let name = prop_oneof![
        1 => prop::sample::select(vec!["traceparent", "a", "b", ""]).prop_map(String::from),
        3 => short_string(target),
    ];
    let most = match target {
        Target::Encoder => 40,
        Target::Stored => 6,
    };
    proptest::collection::vec((name, written(target)), 0..most)
        .prop_map(Headers)
        .boxed()
}
