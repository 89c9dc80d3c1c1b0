//! The bridge's exclusive user namespace: which users it answers for.
//!
//! Synapse proxies key claims only for users in an EXCLUSIVE user namespace
//! of the appservice (or its sender), matching each regex anchored at the
//! start only (Python's `re.match`). We apply the same rule, so a user the
//! homeserver would never proxy is never served either: another appservice
//! or a real user may own a non-exclusive match.

use regex::Regex;
use ruma::{OwnedUserId, ServerName, UserId};

use crate::{AppserviceError, Registration};

/// The users this bridge owns exclusively.
#[derive(Clone, Debug)]
pub struct UserNamespace {
    regexes: Vec<Regex>,
    sender: Option<OwnedUserId>,
}

impl UserNamespace {
    /// A namespace from regexes (matched anchored at the start, like Synapse)
    /// and the bridge bot's own user id.
    pub fn new<'a>(
        exclusive_regexes: impl IntoIterator<Item = &'a str>,
        sender: Option<OwnedUserId>,
    ) -> Result<Self, AppserviceError> {
        let regexes = exclusive_regexes
            .into_iter()
            .map(|r| {
                // Checked alone first: only wrapped, an unbalanced regex such
                // as `x)|(.*` compiles, and matches far more than it says.
                Regex::new(r)
                    .and_then(|_| Regex::new(&format!("^(?:{r})")))
                    .map_err(|source| AppserviceError::BadNamespaceRegex {
                        regex: r.to_owned(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { regexes, sender })
    }

    /// The exclusive user namespaces of a registration, plus its sender
    /// `@<sender_localpart>:<server_name>`. Non-exclusive entries are
    /// ignored: the homeserver does not proxy claims for them.
    pub fn from_registration(
        registration: &Registration,
        server_name: &ServerName,
    ) -> Result<Self, AppserviceError> {
        let sender =
            UserId::parse_with_server_name(registration.sender_localpart.as_str(), server_name)
                .map_err(|e| AppserviceError::BadIdentifier {
                    value: registration.sender_localpart.clone(),
                    reason: e.to_string(),
                })?;
        Self::new(
            registration
                .namespaces
                .users
                .iter()
                .filter(|n| n.exclusive)
                .map(|n| n.regex.as_str()),
            Some(sender),
        )
    }

    /// Whether `user_id` belongs to the bridge. An id outside even the
    /// historical user-id grammar (which ruma parses leniently: a space, a
    /// control or a non-ASCII character in the localpart) belongs to no
    /// one, whatever the regexes say.
    pub fn contains(&self, user_id: &UserId) -> bool {
        (self.sender.as_deref() == Some(user_id)
            || self.regexes.iter().any(|r| r.is_match(user_id.as_str())))
            && user_id.validate_historical().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_are_anchored_at_the_start_only_like_synapse() {
        let ns = UserNamespace::new(["@echo_.*:localhost"], None).expect("regex");
        let yes: &UserId = "@echo_1:localhost".try_into().expect("id");
        let prefix_only: &UserId = "@echo_1:localhost.evil".try_into().expect("id");
        let no: &UserId = "@x_echo_1:localhost".try_into().expect("id");
        assert!(ns.contains(yes));
        assert!(ns.contains(prefix_only), "Synapse matches the start only");
        assert!(!ns.contains(no));
    }

    #[test]
    fn ids_outside_the_historical_grammar_are_never_the_bridges() {
        let ns = UserNamespace::new(["@echo_.*:localhost"], None).expect("regex");
        for bad in [
            "@echo_ x:localhost",
            "@echo_\u{e9}:localhost",
            "@echo_\u{1}:localhost",
        ] {
            let id: &UserId = bad.try_into().expect("ruma parses it leniently");
            assert!(!ns.contains(id), "{bad:?} is not a valid user id");
        }
        let historical: &UserId = "@echo_Upper/x:localhost".try_into().expect("id");
        assert!(ns.contains(historical), "historical ids stay the bridge's");
    }

    #[test]
    fn the_sender_is_in_the_namespace() {
        let sender: OwnedUserId = "@bot:localhost".try_into().expect("id");
        let ns = UserNamespace::new([], Some(sender.clone())).expect("regex");
        assert!(ns.contains(&sender));
    }
}
