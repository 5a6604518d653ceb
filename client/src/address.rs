//! Broker addresses: `host:port`, `http://host:port`, `[::1]:port`, or a bare host (port 7450).

use crate::error::{Error, Result};

/// The port a broker listens on when an address names none.
pub const DEFAULT_PORT: u16 = 7450;

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// `host:port` (IPv6 hosts in brackets), as shown in messages.
    pub authority: String,
}

impl BrokerAddress {
    /// Parses `host:port` or `http://host:port` (a trailing `/` is allowed; a missing port is
    /// [`DEFAULT_PORT`]). `https://` is refused: the broker speaks plaintext HTTP/2 for now.
    pub fn parse(address: &str) -> Result<BrokerAddress> {
        let invalid = |reason: &str| Error::InvalidAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = address.trim();
        let rest = if let Some(rest) = strip_prefix_ignore_case(trimmed, "http://") {
            rest
        } else if strip_prefix_ignore_case(trimmed, "https://").is_some() {
            return Err(invalid("TLS (https://) is not supported; use host:port"));
        } else if trimmed.contains("://") {
            return Err(invalid("the only scheme accepted is http://"));
        } else {
            trimmed
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(invalid("expected host:port"));
        }
        if rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
            return Err(invalid("expected host:port, without a path or user"));
        }
        let (host, port) = split_host_port(rest).map_err(&invalid)?;
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => return Err(invalid("the port must be a number from 1 to 65535")),
                Ok(port) => port,
            },
        };
        Ok(BrokerAddress {
            authority: format!("{host}:{port}"),
        })
    }

    /// The URI tonic connects to: `http://host:port`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.authority)
    }
}

impl std::fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.authority)
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// Splits `host[:port]`; an IPv6 host is in brackets and keeps them.
fn split_host_port(text: &str) -> std::result::Result<(&str, Option<&str>), &'static str> {
    if text.starts_with('[') {
        let Some(end) = text.find(']') else {
            return Err("unclosed '[' in an IPv6 address");
        };
        let (host, rest) = text.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err("expected ':' and a port after the IPv6 address"),
            },
        };
    }
    match text.split_once(':') {
        None => Ok((text, None)),
        Some((_, port)) if port.contains(':') => {
            Err("an IPv6 address must be in brackets, e.g. [::1]:7450")
        }
        Some((host, port)) => Ok((host, Some(port))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(address: &str) -> String {
        BrokerAddress::parse(address).unwrap().authority
    }

    #[test]
    fn given_host_port_with_or_without_scheme_should_parse_to_the_same_authority() {
        assert_eq!(authority("127.0.0.1:7450"), "127.0.0.1:7450");
        assert_eq!(authority("http://127.0.0.1:7450"), "127.0.0.1:7450");
        assert_eq!(authority("HTTP://localhost:9000/"), "localhost:9000");
        assert_eq!(authority("  broker.internal:1 "), "broker.internal:1");
        assert_eq!(authority("[::1]:7450"), "[::1]:7450");
        assert_eq!(
            BrokerAddress::parse("h:5").unwrap().uri(),
            "http://h:5".to_owned()
        );
    }

    #[test]
    fn given_no_port_should_use_the_default_port() {
        assert_eq!(authority("localhost"), "localhost:7450");
        assert_eq!(authority("http://[::1]"), "[::1]:7450");
    }

    #[test]
    fn given_bad_addresses_should_fail_with_a_reason() {
        for bad in [
            "",
            "http://",
            ":7450",
            "host:",
            "host:0",
            "host:65536",
            "host:abc",
            "https://host:1",
            "grpc://host:1",
            "host:1/path",
            "user@host:1",
            "::1:7450",
            "[::1",
            "[::1]x",
        ] {
            let error = BrokerAddress::parse(bad).unwrap_err();
            assert!(
                matches!(&error, Error::InvalidAddress { address, .. } if address == bad),
                "{bad:?}: {error:?}"
            );
        }
    }
}
