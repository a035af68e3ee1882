//! Identifier newtypes. Each has a `parse` that enforces its length and character rules, so an
//! invalid identifier cannot exist past the edge of the service.

use std::fmt;

/// Why an identifier was refused; the message is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub &'static str);

/// Longest agent or user id accepted, in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 256;
/// Longest tool name accepted, in bytes.
pub const MAX_TOOL_LEN: usize = 128;

fn check_principal(value: &str) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId("must not be empty"));
    }
    if value.len() > MAX_PRINCIPAL_LEN {
        return Err(InvalidId("must be at most 256 bytes"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(InvalidId("must not contain control characters"));
    }
    Ok(())
}

macro_rules! principal {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Accepts 1..=256 bytes of UTF-8 without control characters.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check_principal(&value)?;
                Ok(Self(value))
            }

            /// The id as the caller's JWT spelled it.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

principal!(
    /// The agent a caller's JWT was issued to (the configured agent claim).
    AgentId
);
principal!(
    /// The user an agent acts for (the JWT's `sub`).
    UserId
);
principal!(
    /// The issuer that vouched for a caller (the JWT's `iss`, one of the configured issuers).
    /// Part of every identity: two issuers' `agent-a` or `alice` are different principals.
    IssuerId
);

/// A tool (an OAuth2-protected remote service such as an MCP server): `[A-Za-z0-9._:-]{1,128}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tool(String);

impl Tool {
    /// Accepts `[A-Za-z0-9._:-]{1,128}`.
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
        let value = value.into();
        if value.is_empty() {
            return Err(InvalidId("must not be empty"));
        }
        if value.len() > MAX_TOOL_LEN {
            return Err(InvalidId("must be at most 128 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(InvalidId("must match [A-Za-z0-9._:-]{1,128}"));
        }
        Ok(Self(value))
    }

    /// The tool name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tool({:?})", self.0)
    }
}

/// The version of one credential. Strictly increasing per agent and never reused, even after a
/// credential is deleted and stored again, so an old ciphertext can never be replayed as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(u64);

impl Generation {
    /// Generations come from a PostgreSQL sequence, which starts at 1.
    pub fn new(value: u64) -> Option<Self> {
        (value > 0).then_some(Self(value))
    }

    /// The number itself.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_outside_the_alphabet_is_refused() {
        assert!(Tool::parse("jira").is_ok());
        assert!(Tool::parse("mcp:atlassian.jira-cloud_v2").is_ok());
        assert!(Tool::parse("").is_err());
        assert!(Tool::parse("a b").is_err());
        assert!(Tool::parse("jira/../x").is_err());
        assert!(Tool::parse("ж").is_err());
        assert!(Tool::parse("x".repeat(128)).is_ok());
        assert!(Tool::parse("x".repeat(129)).is_err());
    }

    #[test]
    fn principals_refuse_empty_long_and_control_characters() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(AgentId::parse("a\u{0}b").is_err());
        assert!(AgentId::parse("x".repeat(257)).is_err());
    }

    #[test]
    fn generation_zero_does_not_exist() {
        assert!(Generation::new(0).is_none());
        assert_eq!(Generation::new(7).map(Generation::get), Some(7));
    }
}
