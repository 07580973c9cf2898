//! `quic-ceiling`: the bare-quinn ceiling of the datapath bench. One QUIC
//! connection, one stream, memory to memory, with the configurations
//! Ferry's own endpoints use (`ferry_net::tls::site_server` and
//! `dp_client`: the same quinn, rustls provider, cipher, windows, UDP
//! buffers and congestion controller), so that what Ferry adds on top —
//! reading chunks, framing, hashing, writing the file — shows as the
//! difference.
//!
//!   quic-ceiling send ADDR DIR CONGESTION CIPHER
//!       listens on ADDR, writes the CA and a client identity into DIR,
//!       prints "ready", serves one connection: the byte count the client
//!       asks for, from a buffer in memory; prints its CPU seconds as JSON.
//!   quic-ceiling recv ADDR DIR BYTES CONGESTION CIPHER
//!       connects with DIR's identity, asks for BYTES, reads them and
//!       drops them; prints {"bytes", "seconds", "cpu_seconds"}.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use ferry_net::pki;
use ferry_net::tls::{self, Identity, TransportOptions};

/// What one write hands quinn: shared, never copied by the sender.
const WRITE_BYTES: usize = 1 << 20;

fn options(congestion: &str, cipher: &str) -> anyhow::Result<TransportOptions> {
    Ok(TransportOptions {
        congestion: serde_json::from_value(serde_json::json!(congestion))
            .with_context(|| format!("congestion {congestion:?}"))?,
        cipher: serde_json::from_value(serde_json::json!(cipher))
            .with_context(|| format!("cipher {cipher:?}"))?,
    })
}

fn cpu_seconds() -> f64 {
    ferry_benches::cpu_time(std::process::id()).map_or(f64::NAN, |d| d.as_secs_f64())
}

async fn send(addr: SocketAddr, dir: &Path, opts: TransportOptions) -> anyhow::Result<()> {
    let ca = pki::make_ca("CEIL")?;
    let site = pki::issue_site_cert(&ca, "CEIL")?;
    let (dp_key, csr) = pki::make_csr("ceiling")?;
    let dp_cert = pki::cert_pem(&pki::sign_csr(&ca, &csr, "ceiling")?);
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    std::fs::write(dir.join("dp.pem"), dp_cert)?;
    std::fs::write(dir.join("dp.key"), dp_key)?;
    let ca_der = pki::cert_der(&ca.cert_pem, "CA")?;
    let server = tls::site_server(
        &ca_der,
        Identity::from_pem(&site.cert_pem, &site.key_pem, "site")?,
        opts,
    )?;
    let endpoint = tls::endpoint(addr, Some(server))?;
    println!("ready");
    let conn = endpoint.accept().await.context("no connection")?.await?;
    let (mut out, mut ask) = conn.accept_bi().await?;
    let mut want = [0u8; 8];
    ask.read_exact(&mut want).await?;
    let mut left = u64::from_le_bytes(want);
    let block = Bytes::from(vec![0x5a; WRITE_BYTES]);
    while left > 0 {
        let n = left.min(WRITE_BYTES as u64) as usize;
        out.write_chunk(block.slice(..n)).await?;
        left -= n as u64;
    }
    out.finish()?;
    // Until the client has it all and closes.
    conn.closed().await;
    endpoint.wait_idle().await;
    println!("{}", serde_json::json!({ "cpu_seconds": cpu_seconds() }));
    Ok(())
}

async fn recv(
    addr: SocketAddr,
    dir: &Path,
    bytes: u64,
    opts: TransportOptions,
) -> anyhow::Result<()> {
    let ca_der = pki::cert_der(&std::fs::read_to_string(dir.join("ca.pem"))?, "CA")?;
    let me = Identity::from_pem(
        &std::fs::read_to_string(dir.join("dp.pem"))?,
        &std::fs::read_to_string(dir.join("dp.key"))?,
        "client",
    )?;
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let endpoint = tls::endpoint(local, None)?;
    let conn = endpoint
        .connect_with(
            tls::dp_client(&ca_der, me, opts)?,
            addr,
            pki::SITE_SERVER_NAME,
        )?
        .await?;
    let t0 = Instant::now();
    let (mut ask, mut data) = conn.open_bi().await?;
    ask.write_all(&bytes.to_le_bytes()).await?;
    ask.finish()?;
    let mut got = 0u64;
    while let Some(chunk) = data.read_chunk(usize::MAX, true).await? {
        got += chunk.bytes.len() as u64;
    }
    let seconds = t0.elapsed().as_secs_f64();
    anyhow::ensure!(got == bytes, "received {got} bytes of {bytes}");
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    println!(
        "{}",
        serde_json::json!({ "bytes": got, "seconds": seconds, "cpu_seconds": cpu_seconds() })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tls::install_default_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Runtime::new()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["send", addr, dir, cc, cipher] => {
            rt.block_on(send(addr.parse()?, Path::new(dir), options(cc, cipher)?))
        }
        ["recv", addr, dir, bytes, cc, cipher] => rt.block_on(recv(
            addr.parse()?,
            Path::new(dir),
            bytes.parse()?,
            options(cc, cipher)?,
        )),
        _ => anyhow::bail!(
            "usage: quic-ceiling send ADDR DIR CONGESTION CIPHER | recv ADDR DIR BYTES CONGESTION CIPHER"
        ),
    }
}
