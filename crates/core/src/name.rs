//! Channel names: a [`Scope`] (namespace, component, optional endpoint) plus a
//! topic, and the escaping that turns them into one wire subject.
//!
//! Every name is escaped before it is joined, so that no user-chosen name can
//! alias another channel or inject a wildcard: bytes outside `[A-Za-z0-9_-]`
//! (including `.`, `*`, `>`, `%`, spaces and any non-ASCII byte) are written as
//! `%XX` (upper-case hex of each UTF-8 byte). Escaped names never contain `.`,
//! so the number of `.`-separated tokens tells whether an endpoint is present,
//! and each token maps back to exactly one name.

use std::fmt;
use std::sync::Arc;

/// Longest name accepted for any one part of a channel, in bytes, before escaping.
pub const MAX_NAME_LEN: usize = 256;

/// The first token of every subject, so eventplane traffic is recognisable on a
/// shared NATS server and never collides with other users' subjects.
pub const SUBJECT_PREFIX: &str = "ep";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Names must be non-empty (NATS forbids empty subject tokens).
    #[error("the {part} name is empty")]
    Empty {
        /// Which part of the channel: namespace, component, endpoint or topic.
        part: &'static str,
    },
    /// Names are limited to [`MAX_NAME_LEN`] bytes.
    #[error("the {part} name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// Which part of the channel.
        part: &'static str,
        /// Its length in bytes.
        len: usize,
    },
}

/// Where events live: a namespace, a component in it, and optionally an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    namespace: String,
    component: String,
    endpoint: Option<String>,
}

impl Scope {
    /// A scope of a namespace and a component.
    pub fn new(
        namespace: impl Into<String>,
        component: impl Into<String>,
    ) -> Result<Self, NameError> {
        let scope = Self {
            namespace: namespace.into(),
            component: component.into(),
            endpoint: None,
        };
        check("namespace", &scope.namespace)?;
        check("component", &scope.component)?;
        Ok(scope)
    }

    /// The same scope narrowed to one endpoint.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Result<Self, NameError> {
        let endpoint = endpoint.into();
        check("endpoint", &endpoint)?;
        self.endpoint = Some(endpoint);
        Ok(self)
    }

    /// The namespace, unescaped.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The component, unescaped.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The endpoint, unescaped, if the scope has one.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The channel of `topic` in this scope.
    pub fn channel(&self, topic: impl Into<String>) -> Result<Channel, NameError> {
        Channel::new(self.clone(), topic)
    }
}

/// A scope and a topic: the unit a publisher publishes to and a subscriber
/// subscribes to. Its [`subject`](Channel::subject) is its identity on the wire.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    scope: Scope,
    topic: String,
    subject: Arc<str>,
}

impl Channel {
    /// The channel of `topic` in `scope`.
    pub fn new(scope: Scope, topic: impl Into<String>) -> Result<Self, NameError> {
        let topic = topic.into();
        check("topic", &topic)?;
        let mut subject = String::with_capacity(64);
        subject.push_str(SUBJECT_PREFIX);
        for part in [
            Some(scope.namespace.as_str()),
            Some(scope.component.as_str()),
            scope.endpoint.as_deref(),
            Some(topic.as_str()),
        ]
        .into_iter()
        .flatten()
        {
            subject.push('.');
            escape_into(part, &mut subject);
        }
        Ok(Self {
            scope,
            topic,
            subject: subject.into(),
        })
    }

    /// The scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The topic, unescaped.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The wire subject: `ep.<namespace>.<component>[.<endpoint>].<topic>`,
    /// each name escaped. It is the NATS subject and the ZMQ topic frame, and it
    /// is repeated inside every envelope.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The subject as a shared string, cheap to clone.
    pub fn subject_arc(&self) -> Arc<str> {
        self.subject.clone()
    }

    /// Parses a subject back into its channel; `None` if it is not one this
    /// module produced.
    pub fn from_subject(subject: &str) -> Option<Channel> {
        let mut tokens = subject.split('.');
        if tokens.next()? != SUBJECT_PREFIX {
            return None;
        }
        let parts: Vec<String> = tokens.map(unescape).collect::<Option<_>>()?;
        let (ns, comp, endpoint, topic) = match parts.as_slice() {
            [ns, comp, topic] => (ns, comp, None, topic),
            [ns, comp, ep, topic] => (ns, comp, Some(ep), topic),
            _ => return None,
        };
        let mut scope = Scope::new(ns.clone(), comp.clone()).ok()?;
        if let Some(ep) = endpoint {
            scope = scope.with_endpoint(ep.clone()).ok()?;
        }
        let channel = Channel::new(scope, topic.clone()).ok()?;
        // Only the canonical escaping round-trips (e.g. `%61` for `a` does not).
        (channel.subject() == subject).then_some(channel)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Channel").field(&self.subject).finish()
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.subject)
    }
}

fn check(part: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { part });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            part,
            len: name.len(),
        });
    }
    Ok(())
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Appends `name` to `out`, escaped as described in the module docs.
pub fn escape_into(name: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in name.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

/// `name` escaped as described in the module docs.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    escape_into(name, &mut out);
    out
}

/// Reverses [`escape`]; `None` for anything `escape` could not have produced.
pub fn unescape(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = token.get(i + 1..i + 3)?;
                if hex.bytes().any(|c| c.is_ascii_lowercase()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if is_plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_are_kept_readable() {
        let ch = Scope::new("dynamo", "backend")
            .unwrap()
            .channel("kv-events")
            .unwrap();
        assert_eq!(ch.subject(), "ep.dynamo.backend.kv-events");
        let ch = Scope::new("dynamo", "backend")
            .unwrap()
            .with_endpoint("generate")
            .unwrap()
            .channel("kv_metrics")
            .unwrap();
        assert_eq!(ch.subject(), "ep.dynamo.backend.generate.kv_metrics");
    }

    #[test]
    fn separators_and_wildcards_are_escaped() {
        let ch = Scope::new("a.b", "*").unwrap().channel(">").unwrap();
        assert_eq!(ch.subject(), "ep.a%2Eb.%2A.%3E");
        // A dot in a name cannot fake an endpoint.
        let with_dot = Scope::new("ns", "comp.ep").unwrap().channel("t").unwrap();
        let with_ep = Scope::new("ns", "comp")
            .unwrap()
            .with_endpoint("ep")
            .unwrap()
            .channel("t")
            .unwrap();
        assert_ne!(with_dot.subject(), with_ep.subject());
    }

    #[test]
    fn empty_and_long_names_are_refused() {
        assert_eq!(
            Scope::new("", "c"),
            Err(NameError::Empty { part: "namespace" })
        );
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            Scope::new("n", long),
            Err(NameError::TooLong {
                part: "component",
                ..
            })
        ));
        assert!(Scope::new("n", "c").unwrap().channel("").is_err());
    }

    #[test]
    fn non_canonical_subjects_are_rejected() {
        assert!(Channel::from_subject("ep.%61.b.c").is_none());
        assert!(Channel::from_subject("ep.a.b.%2e").is_none());
        assert!(Channel::from_subject("xx.a.b.c").is_none());
        assert!(Channel::from_subject("ep.a.b").is_none());
        assert!(Channel::from_subject("ep.a.b.c.d.e").is_none());
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,8}",
            proptest::string::string_regex("[ -~]{1,12}").unwrap(),
            any::<String>().prop_filter("non-empty", |s| !s.is_empty() && s.len() <= MAX_NAME_LEN),
        ]
    }

    proptest! {
        #[test]
        fn escaping_round_trips(s in any::<String>()) {
            prop_assert_eq!(unescape(&escape(&s)), Some(s));
        }

        #[test]
        fn subjects_identify_channels(
            a in (name(), name(), proptest::option::of(name()), name()),
            b in (name(), name(), proptest::option::of(name()), name()),
        ) {
            let make = |(ns, c, ep, t): (String, String, Option<String>, String)| {
                let mut s = Scope::new(ns, c).unwrap();
                if let Some(ep) = ep { s = s.with_endpoint(ep).unwrap(); }
                s.channel(t).unwrap()
            };
            let (ca, cb) = (make(a), make(b));
            prop_assert_eq!(ca == cb, ca.subject() == cb.subject());
            prop_assert_eq!(Channel::from_subject(ca.subject()), Some(ca.clone()));
            // No subject is a NATS wildcard or has an empty token.
            for tok in ca.subject().split('.') {
                prop_assert!(!tok.is_empty() && tok != "*" && tok != ">");
            }
        }
    }
}
