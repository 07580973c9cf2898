//! Who may download from a DP: client tokens checked against the site's
//! manifest key and code, and the client policy the site last sent.

use std::sync::RwLock;

use ferry_wire::pb;

/// Who may download: the site's key and code check a token's signature,
/// the policy the site last sent says what a signature cannot.
pub struct ClientGate {
    key: Vec<u8>,
    site_code: String,
    policy: RwLock<pb::ClientPolicy>,
}

impl ClientGate {
    /// A gate for tokens of site `site_code`, signed with `key`.
    pub fn new(key: Vec<u8>, site_code: String, policy: pb::ClientPolicy) -> Self {
        Self {
            key,
            site_code,
            policy: RwLock::new(policy),
        }
    }

    /// Takes the site's latest policy.
    pub fn set_policy(&self, p: pb::ClientPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Whether the site marked `package` multicast-only.
    pub fn multicast_only(&self, package: &str) -> bool {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .multicast_only
            .iter()
            .any(|p| p == package)
    }

    /// The DP's multicast settings and packages, when it runs sessions.
    pub fn multicast(&self) -> Option<pb::MulticastPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .multicast
            .clone()
    }

    /// The client's name (`anonymous` without a token), or why it is
    /// refused.
    pub fn check(&self, authorization: Option<&str>) -> Result<String, String> {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let Some(auth) = authorization else {
            return if policy.anonymous {
                Ok("anonymous".into())
            } else {
                Err("no client token (Authorization: Bearer …); this DP serves only clients with one".into())
            };
        };
        let Some(token) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
        else {
            return Err("the Authorization header is not a bearer token".into());
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = ferry_net::client_token::verify(&self.key, &self.site_code, token, now)
            .map_err(|e| e.to_string())?;
        if policy.revoked.contains(&claims.id) {
            return Err(ferry_net::client_token::TokenError::Revoked(claims.name).to_string());
        }
        Ok(claims.name)
    }
}
