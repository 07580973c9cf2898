//! Client tokens and client access, as the site keeps them.
//!
//! `ferry client token create` signs a token with the site's manifest key
//! (`ferry_net::client_token`); the site keeps a record per name (never the
//! token itself) so it can list and revoke them. Revoked ids that have not
//! expired yet go to every DP with its assignments ([`policy_for`]), with
//! whether that DP lets clients in without a token.

use serde::{Deserialize, Serialize};

use ferry_net::client_token::{self, Claims};
use ferry_net::pki::SigningKey;

use crate::distribution::records::{ClientTokenRecord, Registry};
use crate::distribution::registry::{Hub, HubError};

/// A token as `ferry client token list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTokenView {
    /// Its name.
    pub name: String,
    /// Its record.
    #[serde(flatten)]
    pub record: ClientTokenRecord,
    /// `active`, `expired` or `revoked`.
    pub state: String,
}

/// Answer of `POST /api/v1/client-tokens`: the token, shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    /// Its name.
    pub name: String,
    /// The bearer token.
    pub token: String,
    /// Its expiry (Unix seconds), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn state_of(rec: &ClientTokenRecord, now: i64) -> &'static str {
    if rec.revoked.is_some() {
        "revoked"
    } else if rec.expires.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    }
}

/// What DP `dp` must know about client access; `multicast_only` says
/// whether a package may travel by multicast only.
pub fn policy_for(
    reg: &Registry,
    dp: &str,
    multicast_only: impl Fn(&str) -> bool,
) -> ferry_wire::pb::ClientPolicy {
    let now = unix_now();
    ferry_wire::pb::ClientPolicy {
        anonymous: reg.dps.get(dp).is_some_and(|d| d.anonymous_clients),
        revoked: reg
            .clients
            .values()
            .filter(|r| r.revoked.is_some() && r.expires.is_none_or(|at| at > now))
            .map(|r| r.id.clone())
            .collect(),
        multicast_only: reg
            .assigned(dp)
            .into_iter()
            .filter(|p| multicast_only(p))
            .collect(),
        multicast: None,
    }
}

impl Hub {
    /// Issues a token named `name`, valid for `valid_secs` (forever when
    /// `None`), signed with `key` for site `site_code`.
    pub fn create_client_token(
        &self,
        key: &SigningKey,
        site_code: &str,
        name: &str,
        valid_secs: Option<u64>,
    ) -> Result<IssuedToken, HubError> {
        crate::distribution::registry::check_name(name)?;
        let issued = unix_now();
        let expires = match valid_secs {
            Some(s) => Some(
                i64::try_from(s)
                    .ok()
                    .and_then(|s| issued.checked_add(s))
                    .ok_or_else(|| HubError::Invalid(format!("--expires: {s} s is too long")))?,
            ),
            None => None,
        };
        let id = client_token::new_id().map_err(|e| self.storage(e))?;
        let claims = Claims {
            site: site_code.to_string(),
            name: name.to_string(),
            id: id.clone(),
            issued,
            expires,
        };
        let token = client_token::issue(key, &claims).map_err(|e| self.storage(e))?;
        self.update(false, |reg| {
            if let Some(old) = reg.clients.get(name) {
                if state_of(old, issued) == "active" {
                    return Err(HubError::Exists {
                        what: "client token",
                        name: name.to_string(),
                    });
                }
            }
            reg.clients.insert(
                name.to_string(),
                ClientTokenRecord {
                    id,
                    issued,
                    expires,
                    revoked: None,
                },
            );
            Ok(())
        })?;
        Ok(IssuedToken {
            name: name.to_string(),
            token,
            expires,
        })
    }

    /// Revokes token `name`; every connected DP hears of it at once.
    pub fn revoke_client_token(&self, name: &str) -> Result<(), HubError> {
        self.update(true, |reg| {
            let rec = reg
                .clients
                .get_mut(name)
                .ok_or_else(|| HubError::NoClientToken(name.to_string()))?;
            if rec.revoked.is_none() {
                rec.revoked = Some(crate::now());
            }
            Ok(())
        })
    }

    /// Every token the site issued, by name.
    pub fn client_tokens(&self) -> Vec<ClientTokenView> {
        let now = unix_now();
        self.snapshot()
            .clients
            .into_iter()
            .map(|(name, record)| ClientTokenView {
                state: state_of(&record, now).to_string(),
                name,
                record,
            })
            .collect()
    }

    /// Records the names of DP `dp`'s HTTPS certificate.
    pub fn set_client_names(&self, dp: &str, names: &[String]) -> Result<(), HubError> {
        self.update(false, |reg| {
            if let Some(d) = reg.dps.get_mut(dp) {
                d.client_names = names.to_vec();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_revoked_unexpired_tokens_travel_and_anonymous_is_per_dp() {
        let mut reg = Registry::default();
        let now = unix_now();
        let rec = |id: &str, expires: Option<i64>, revoked: bool| ClientTokenRecord {
            id: id.into(),
            issued: now - 10,
            expires,
            revoked: revoked.then(crate::now),
        };
        reg.clients.insert("a".into(), rec("aa", None, true));
        reg.clients
            .insert("b".into(), rec("bb", Some(now - 1), true));
        reg.clients
            .insert("c".into(), rec("cc", Some(now + 99), false));
        reg.clients
            .insert("d".into(), rec("dd", Some(now + 99), true));
        reg.dps.insert(
            "dp1".into(),
            crate::distribution::records::DpRecord {
                anonymous_clients: true,
                packages: ["FRY00001".to_string(), "FRY00002".to_string()].into(),
                ..crate::distribution::records::DpRecord::new("dp1")
            },
        );
        let p = policy_for(&reg, "dp1", |p| p == "FRY00002" || p == "FRY00009");
        assert!(p.anonymous);
        assert_eq!(p.revoked, vec!["aa".to_string(), "dd".to_string()]);
        assert_eq!(p.multicast_only, vec!["FRY00002".to_string()]);
        assert!(!policy_for(&reg, "dp2", |_| true).anonymous);
        assert_eq!(state_of(&reg.clients["b"], now), "revoked");
        assert_eq!(state_of(&reg.clients["c"], now), "active");
        assert_eq!(state_of(&rec("x", Some(now), false), now), "expired");
    }
}
