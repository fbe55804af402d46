//! Which exports a client may see and open.
//!
//! An export with an allow-list is visible (in `LIST`, `INFO`, `GO`, `EXPORT_NAME`, the meta
//! context options) only to a client whose verified TLS certificate carries one of the listed
//! names ([`ClientIdentity::has_name`]); to every other client, including plaintext ones, it
//! does not exist: the reply is the one for an unknown name, so a refused client learns
//! nothing about it. Exports without an allow-list are open to every client the listener
//! admitted (which, beyond loopback, means a client with a certificate from the client CA).

use std::collections::BTreeMap;

use crate::tls::ClientIdentity;

/// Per-export allow-lists of client identities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    allow: BTreeMap<String, Vec<String>>,
}

impl Access {
    /// Every export open to every admitted client.
    pub fn open() -> Self {
        Self::default()
    }

    /// Restricts `export` to clients carrying one of `names`.
    pub fn restrict(&mut self, export: impl Into<String>, names: Vec<String>) {
        self.allow.insert(export.into(), names);
    }

    /// Is any export restricted?
    pub fn is_restricted(&self) -> bool {
        !self.allow.is_empty()
    }

    /// The exports that have an allow-list.
    pub fn restricted_exports(&self) -> impl Iterator<Item = &str> {
        self.allow.keys().map(String::as_str)
    }

    /// May this client see and open `export`?
    pub fn permits(&self, export: &str, client: Option<&ClientIdentity>) -> bool {
        match self.allow.get(export) {
            None => true,
            Some(names) => client.is_some_and(|c| names.iter().any(|n| c.has_name(n))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(cn: &str) -> ClientIdentity {
        ClientIdentity::with_common_name(cn)
    }

    #[test]
    fn allow_lists_restrict_only_their_export() {
        let mut a = Access::open();
        assert!(a.permits("vm1", None));
        a.restrict("vm1", vec!["hv1".into()]);
        assert!(!a.permits("vm1", None));
        assert!(!a.permits("vm1", Some(&client("hv2"))));
        assert!(a.permits("vm1", Some(&client("hv1"))));
        assert!(a.permits("vm2", None));
        a.restrict("vm3", vec![]);
        assert!(!a.permits("vm3", Some(&client("hv1"))));
    }
}
