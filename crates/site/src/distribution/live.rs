//! The DPs connected right now: their QUIC connections, kept by the
//! endpoint that accepted them ([`crate::distribution::endpoint`]) and read
//! by the operator API (who is online; a revoked or removed DP's connection
//! is closed here). Nothing of it is recorded: a DP's record keeps its last
//! contact and address ([`crate::distribution::registry::Hub::contact`]).

use std::collections::HashMap;
use std::sync::Mutex;

use ferry_wire::CLOSE_REVOKED;

/// A DP connected right now.
#[derive(Clone, Debug)]
pub struct Online {
    /// Its address.
    pub address: String,
    /// Since when.
    pub since: time::OffsetDateTime,
    /// The connection, closed when the DP is revoked.
    pub conn: quinn::Connection,
}

/// The connections of the DPs online, by name.
#[derive(Debug, Default)]
pub struct Connections {
    online: Mutex<HashMap<String, Online>>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Online>> {
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `dp` is connected on `conn` (a newer connection replaces an older
    /// one). Returns its address.
    pub fn add(&self, dp: &str, conn: &quinn::Connection) -> String {
        let address = conn.remote_address().to_string();
        self.lock().insert(
            dp.to_string(),
            Online {
                address: address.clone(),
                since: crate::now(),
                conn: conn.clone(),
            },
        );
        address
    }

    /// `conn` of `dp` ended; only its current connection is forgotten.
    pub fn remove(&self, dp: &str, conn: &quinn::Connection) {
        let mut online = self.lock();
        if online
            .get(dp)
            .is_some_and(|o| o.conn.stable_id() == conn.stable_id())
        {
            online.remove(dp);
        }
    }

    /// Whether `dp` is connected, from where and since when.
    pub fn get(&self, dp: &str) -> Option<Online> {
        self.lock().get(dp).cloned()
    }

    /// Whether `dp` is connected.
    pub fn is_online(&self, dp: &str) -> bool {
        self.lock().contains_key(dp)
    }

    /// Closes `dp`'s connection, telling it `why` with the code that stops
    /// it from dialling again (it was revoked or removed).
    pub fn close_refused(&self, dp: &str, why: &'static [u8]) {
        if let Some(o) = self.lock().remove(dp) {
            o.conn.close(CLOSE_REVOKED.into(), why);
        }
    }
}
