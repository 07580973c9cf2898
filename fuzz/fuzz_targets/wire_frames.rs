//! Frames as a peer sends them: the first byte picks the message type, the
//! rest is a stream of length-prefixed frames read by `read_frame` with the
//! limits the site and DP use; manifests that decode are expanded against
//! a base and turned into file manifests as a DP does.
#![no_main]
use ferry_wire::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

async fn frames<M: Message + Default>(mut r: &[u8], max: usize) -> Vec<M> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = ferry_wire::read_frame::<M>(&mut r, max).await {
        out.push(m);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        match kind % 4 {
            0 => {
                frames::<pb::Request>(rest, ferry_wire::MAX_REQUEST_BYTES).await;
            }
            1 => {
                frames::<pb::Request>(rest, ferry_wire::MAX_ENROLL_BYTES).await;
            }
            2 => {
                for reply in frames::<pb::Reply>(rest, ferry_wire::MAX_REPLY_BYTES).await {
                    let _ = reply.encoded_len();
                }
            }
            _ => {
                if let Ok(mut body) = pb::ManifestBody::decode(rest) {
                    let base = ferry_core::manifest::Manifest::of_parts("base", [&b"base"[..]]);
                    if ferry_wire::expand(&mut body, &base.chunks).is_ok() {
                        for f in &body.files {
                            let _ = ferry_wire::file_from_wire(f);
                        }
                    }
                }
            }
        }
    });
});
