//! Which source a pull DP takes a revision from (`ferry dp set NAME
//! --pull-from SRC:RANK,…`), from what the site's latest assignments say:
//! a source that holds it, lowest rank first and a random one among equal
//! ranks, skipping those that failed this transfer; else wait for a source
//! that is getting it; else the site. And how it reaches one ([`dial`]).

use ferry_wire::pb;

use crate::error::{Context as _, DpError, Result};

/// The name a pull DP dials its sources by (they are pinned by
/// certificate, not by name).
const PEER_SERVER_NAME: &str = "ferry-dp";
/// How long a pull DP waits for a source to answer before it turns to the
/// next.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection to source DP `src` with this DP's certificate and key
/// (`identity`, PEM), the source pinned to the certificate the site named.
pub(crate) async fn dial(
    src: &pb::PullSource,
    identity: &(String, String),
    transport: ferry_net::tls::TransportOptions,
) -> Result<quinn::Connection> {
    let addr: std::net::SocketAddr = src.address.parse().map_err(|_| {
        DpError::Usage(format!(
            "source DP {} has no usable address ({:?})",
            src.dp, src.address
        ))
    })?;
    let me = ferry_net::tls::Identity::from_pem(&identity.0, &identity.1, "DP certificate")?;
    let client = ferry_net::tls::dp_peer_client(me, &src.fingerprint, transport)?;
    let endpoint = crate::client_endpoint(addr)?;
    let connecting = endpoint
        .connect_with(client, addr, PEER_SERVER_NAME)
        .map_err(|e| {
            DpError::net(
                format!("cannot dial source DP {}", src.dp),
                std::io::Error::other(e),
            )
        })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(c) => c.with_context(|| format!("cannot connect to source DP {} at {addr}", src.dp)),
        Err(_) => Err(DpError::Disconnected(format!(
            "source DP {} did not answer at {addr} within {} s",
            src.dp,
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Where to take a revision from now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// From the site.
    Site,
    /// Wait until this source has it (the site tells when).
    Wait(String),
    /// From this source.
    Source(pb::PullSource),
}

/// Where to take `a` from, given the site's `latest` assignments and the
/// sources that `failed` this transfer already.
pub(crate) fn pick(
    latest: Option<&pb::Assignments>,
    a: &pb::Assignment,
    failed: &[String],
) -> Pick {
    let Some(l) = latest else {
        return Pick::Site;
    };
    let Some(item) = l
        .items
        .iter()
        .find(|i| i.package == a.package && i.revision == a.revision && i.grant.is_some())
    else {
        return Pick::Site;
    };
    let usable = |names: &[String]| -> Vec<&pb::PullSource> {
        l.sources
            .iter()
            .filter(|s| names.contains(&s.dp) && !failed.contains(&s.dp) && !s.address.is_empty())
            .collect()
    };
    let holders = usable(&item.holders);
    if let Some(best) = holders.iter().map(|s| s.rank).min() {
        let equal: Vec<&&pb::PullSource> = holders.iter().filter(|s| s.rank == best).collect();
        let one = equal[rand::random_range(0..equal.len())];
        return Pick::Source((*one).clone());
    }
    match usable(&item.coming).into_iter().min_by_key(|s| s.rank) {
        Some(s) => Pick::Wait(s.dp.clone()),
        None => Pick::Site,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dp: &str, rank: u32) -> pb::PullSource {
        pb::PullSource {
            dp: dp.into(),
            address: "10.0.0.1:7444".into(),
            fingerprint: "ab".into(),
            rank,
        }
    }

    fn latest(holders: &[&str], coming: &[&str]) -> pb::Assignments {
        pb::Assignments {
            items: vec![pb::Assignment {
                package: "FRY00001".into(),
                revision: 2,
                grant: Some(pb::SignedGrant::default()),
                holders: holders.iter().map(|s| s.to_string()).collect(),
                coming: coming.iter().map(|s| s.to_string()).collect(),
                ..pb::Assignment::default()
            }],
            sources: vec![source("a", 1), source("b", 1), source("c", 2)],
            ..pb::Assignments::default()
        }
    }

    fn want() -> pb::Assignment {
        pb::Assignment {
            package: "FRY00001".into(),
            revision: 2,
            ..pb::Assignment::default()
        }
    }

    #[test]
    fn the_lowest_rank_holding_it_first_at_random_then_the_next_then_the_site() {
        let l = latest(&["a", "b", "c"], &[]);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            match pick(Some(&l), &want(), &[]) {
                Pick::Source(s) => {
                    assert_eq!(s.rank, 1);
                    seen.insert(s.dp);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen.len(), 2, "both rank-1 sources are picked");
        let failed = ["a".to_string(), "b".to_string()];
        assert_eq!(
            pick(Some(&l), &want(), &failed),
            Pick::Source(source("c", 2))
        );
        let failed = ["a".into(), "b".into(), "c".into()];
        assert_eq!(pick(Some(&l), &want(), &failed), Pick::Site);
    }

    #[test]
    fn a_source_getting_it_is_waited_for_and_none_means_the_site() {
        assert_eq!(
            pick(Some(&latest(&[], &["c", "b"])), &want(), &[]),
            Pick::Wait("b".into())
        );
        assert_eq!(
            pick(Some(&latest(&[], &["b"])), &want(), &["b".into()]),
            Pick::Site
        );
        assert_eq!(pick(Some(&latest(&[], &[])), &want(), &[]), Pick::Site);
        // Another revision, no grant, or no assignments: the site.
        let other = pb::Assignment {
            revision: 3,
            ..want()
        };
        assert_eq!(pick(Some(&latest(&["a"], &[])), &other, &[]), Pick::Site);
        let mut l = latest(&["a"], &[]);
        l.items[0].grant = None;
        assert_eq!(pick(Some(&l), &want(), &[]), Pick::Site);
        assert_eq!(pick(None, &want(), &[]), Pick::Site);
        // A holder without an address is no use.
        let mut l = latest(&["a"], &[]);
        l.sources[0].address.clear();
        assert_eq!(pick(Some(&l), &want(), &[]), Pick::Site);
    }
}
