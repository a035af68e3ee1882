//! How one setting's value is read. Settings arrive as text (the environment) or as whatever
//! TOML typed them (`8`, `true`), so every kind of value is read from its text: a number in a
//! file and the same number in the environment mean the same thing, and a malformed one is
//! refused with the same words wherever it came from. Also the [`settings!`] macro that turns
//! the one list of settings into the `Config` struct and its documentation.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserializer;
use serde::de::{Error as _, Visitor};

/// A kind of setting value.
pub trait Setting: Sized {
    /// Whether an empty value means "not set" (the default applies) rather than being read.
    const EMPTY_IS_UNSET: bool = true;
    /// Reads the value from its text; the error completes "NAME: …".
    fn parse(text: &str) -> Result<Self, String>;
    /// The value as `config` prints it; secrets print redacted, unset prints empty.
    fn show(&self) -> String;
    /// The number, for settings checked against a range.
    fn number(&self) -> Option<u64> {
        None
    }
}

/// What a setting accepts, as the docs print it; a numeric range is also enforced.
#[derive(Debug, Clone)]
pub enum Accepts {
    /// A whole number in this range.
    Range(RangeInclusive<u64>),
    /// A description of the accepted form.
    Form(&'static str),
}

impl From<RangeInclusive<u64>> for Accepts {
    fn from(range: RangeInclusive<u64>) -> Self {
        Self::Range(range)
    }
}

impl From<&'static str> for Accepts {
    fn from(form: &'static str) -> Self {
        Self::Form(form)
    }
}

impl std::fmt::Display for Accepts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Range(range) => write!(f, "{} to {}", range.start(), range.end()),
            Self::Form(form) => f.write_str(form),
        }
    }
}

/// One setting as `config` and `config --docs` show it.
#[derive(Debug, Clone)]
pub struct Described {
    /// As spelled in the environment.
    pub name: String,
    /// The value, redacted when secret.
    pub value: String,
    /// Accepted values.
    pub accepts: Accepts,
    /// The doc comment.
    pub doc: String,
    /// See [`Setting::EMPTY_IS_UNSET`].
    pub empty_is_unset: bool,
}

/// Deserializes any setting from its text; used for every field of `Config`.
pub fn read<'de, D: Deserializer<'de>, T: Setting>(de: D) -> Result<T, D::Error> {
    let text = de.deserialize_any(Text)?;
    T::parse(&text).map_err(D::Error::custom)
}

/// Renders a scalar as the text the environment would have held.
struct Text;

/// One `visit_*` method per scalar type, each returning the value's text.
macro_rules! scalars_as_text {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method<E>(self, v: $ty) -> Result<String, E> {
            Ok(v.to_string())
        })*
    };
}

impl<'de> Visitor<'de> for Text {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a single value")
    }
    scalars_as_text!(
        visit_str: &str,
        visit_bool: bool,
        visit_u64: u64,
        visit_i64: i64,
        visit_u128: u128,
        visit_i128: i128,
        visit_f64: f64
    );

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(A::Error::custom("must be a single value"))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(A::Error::custom("must be a single value"))
    }
}

/// What an error message quotes of a bad value: enough to recognise it, never a whole secret.
pub fn truncate(value: &str) -> String {
    value.chars().take(40).collect()
}

impl Setting for u64 {
    const EMPTY_IS_UNSET: bool = false;
    fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("must be a whole number, got {:?}", truncate(text)))
    }
    fn show(&self) -> String {
        self.to_string()
    }
    fn number(&self) -> Option<u64> {
        Some(*self)
    }
}

impl Setting for bool {
    // An empty value is read, as false: so a default-true switch can be turned off by `NAME=`.
    const EMPTY_IS_UNSET: bool = false;
    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "false" | "0" | "no" => Ok(false),
            "true" | "1" | "yes" => Ok(true),
            other => Err(format!("must be true or false, got {:?}", truncate(other))),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// Settings taken as written, each shown its own way.
macro_rules! as_written {
    ($($ty:ty => $show:expr),*) => {
        $(impl Setting for $ty {
            fn parse(text: &str) -> Result<Self, String> {
                Ok(Self::from(text))
            }
            fn show(&self) -> String {
                ($show)(self)
            }
        })*
    };
}

as_written!(
    String => String::clone,
    PathBuf => |path: &PathBuf| path.display().to_string(),
    SecretString => |_: &SecretString| String::from("[redacted]")
);

impl Setting for SocketAddr {
    fn parse(text: &str) -> Result<Self, String> {
        text.trim().parse().map_err(|_| {
            format!(
                "must be host:port such as 127.0.0.1:50051, got {:?}",
                truncate(text)
            )
        })
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// A comma-separated list; blanks around and between items are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

impl Setting for List {
    fn parse(text: &str) -> Result<Self, String> {
        let items = text.split(',').map(str::trim).filter(|s| !s.is_empty());
        Ok(Self(items.map(String::from).collect()))
    }
    fn show(&self) -> String {
        self.0.join(",")
    }
}

impl<T: Setting> Setting for Option<T> {
    const EMPTY_IS_UNSET: bool = T::EMPTY_IS_UNSET;
    fn parse(text: &str) -> Result<Self, String> {
        if T::EMPTY_IS_UNSET && text.trim().is_empty() {
            return Ok(None);
        }
        T::parse(text).map(Some)
    }
    fn show(&self) -> String {
        self.as_ref().map(T::show).unwrap_or_default()
    }
    fn number(&self) -> Option<u64> {
        self.as_ref().and_then(T::number)
    }
}

/// Declares the settings struct from one list: each field's doc comment, type, default and
/// accepted values. The field name is the setting's name in lower case (figment lower-cases
/// environment names), so a name is never spelled twice.
macro_rules! settings {
    (
        $(#[doc = $doc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $field_doc:literal])+
                $field:ident: $ty:ty = $default:expr, $accepts:expr;
            )*
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[doc = $field_doc])+
                #[serde(deserialize_with = "crate::config::value::read")]
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        impl $name {
            /// Every setting with its value here, in declaration order.
            pub fn describe(&self) -> Vec<$crate::config::value::Described> {
                vec![$($crate::config::value::Described {
                    name: stringify!($field).to_ascii_uppercase(),
                    value: $crate::config::value::Setting::show(&self.$field),
                    accepts: $accepts.into(),
                    doc: concat!($($field_doc),+).trim().to_string(),
                    empty_is_unset: <$ty as $crate::config::value::Setting>::EMPTY_IS_UNSET,
                }),*]
            }

            /// Each numeric setting outside its range.
            fn out_of_range(&self) -> Vec<ConfigError> {
                let numbers = [$(
                    $crate::config::value::Setting::number(&self.$field)
                ),*];
                self.describe()
                    .into_iter()
                    .zip(numbers)
                    .filter_map(|(setting, number)| match (setting.accepts, number) {
                        ($crate::config::value::Accepts::Range(range), Some(n))
                            if !range.contains(&n) =>
                        {
                            Some(ConfigError::new(
                                setting.name,
                                format!(
                                    "must be between {} and {}, got {n}",
                                    range.start(),
                                    range.end()
                                ),
                            ))
                        }
                        _ => None,
                    })
                    .collect()
            }
        }
    };
}
pub(crate) use settings;
