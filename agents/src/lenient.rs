//! Fields read leniently: a value of an unexpected JSON type reads as absent instead of
//! failing the whole record (the record itself is always kept whole elsewhere).

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// A string field that reads as `None` when the JSON holds anything but a string.
#[derive(Default, Debug)]
pub(crate) struct LStr(pub Option<String>);

/// A boolean field that reads as `None` when the JSON holds anything but a boolean.
#[derive(Default, Debug)]
pub(crate) struct LBool(pub Option<bool>);

struct Lenient;

enum Any {
    Str(String),
    Bool(bool),
    Num(i64),
    Other,
}

impl<'de> Visitor<'de> for Lenient {
    type Value = Any;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Any, E> {
        Ok(Any::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Any, E> {
        Ok(Any::Str(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Any, E> {
        Ok(Any::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Any, E> {
        Ok(Any::Num(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Any, E> {
        Ok(Any::Num(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Any, E> {
        Ok(if v.is_finite() { Any::Num(v as i64) } else { Any::Other })
    }
    fn visit_unit<E: de::Error>(self) -> Result<Any, E> {
        Ok(Any::Other)
    }
    fn visit_none<E: de::Error>(self) -> Result<Any, E> {
        Ok(Any::Other)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Any, D::Error> {
        d.deserialize_any(Lenient)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Any, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Any::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Any, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Any::Other)
    }
}

impl<'de> Deserialize<'de> for LStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LStr, D::Error> {
        Ok(LStr(match d.deserialize_any(Lenient)? {
            Any::Str(s) => Some(s),
            _ => None,
        }))
    }
}

impl<'de> Deserialize<'de> for LBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LBool, D::Error> {
        Ok(LBool(match d.deserialize_any(Lenient)? {
            Any::Bool(b) => Some(b),
            _ => None,
        }))
    }
}


/// A number field (an integer, or a float cut to one) that reads as `None` otherwise.
#[derive(Default, Debug)]
pub(crate) struct LNum(pub Option<i64>);

impl<'de> Deserialize<'de> for LNum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LNum, D::Error> {
        Ok(LNum(match d.deserialize_any(Lenient)? {
            Any::Num(n) => Some(n),
            _ => None,
        }))
    }
}
