//! Issue 7: the whole client flow over TLS with a certificate made here, a wrong CA refused,
//! and plain TCP beyond loopback refused.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA and a server certificate for 127.0.0.1 and localhost; returns (ca, cert, key) paths.
fn make_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let paths = (dir.join(format!("{name}-ca.pem")), dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

fn run(args: &[&str], outbox: &Path, ca: &Path) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("CAPSYNC_OUTBOX", outbox)
        .env("CAPSYNC_TLS_CA", ca)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

on_both_stores! {
    #[test]
    fn the_client_flow_works_over_tls_and_a_wrong_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = make_pki(dir.path(), "good");
        let (other_ca, _, _) = make_pki(dir.path(), "other");
        let data = dir.path().join("data");
        let server = Server::start_with_args(&data, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
        let admin_uri = std::fs::read_to_string(data.join("admin.uri")).unwrap();
        assert!(admin_uri.starts_with("capsyncs://127.0.0.1:"), "the admin URI says TLS");
        let outbox = dir.path().join("outbox.db");
        let admin_file = data.join("admin.uri");
        let admin_file = admin_file.to_str().unwrap();

        let mut client_logs = String::new();
        let (ok, owner, stderr) = run(&["admin", "--admin-file", admin_file, "create-session", "--title", "tls"], &outbox, &ca);
        assert!(ok, "{stderr}");
        client_logs.push_str(&stderr);
        let owner = owner.trim().to_owned();
        assert!(owner.starts_with("capsyncs://"));
        let (ok, reader, stderr) = run(&["share", &owner, "--rights", "read"], &outbox, &ca);
        assert!(ok, "{stderr}");
        client_logs.push_str(&stderr);
        let ops = dir.path().join("ops.jsonl");
        std::fs::write(&ops, "{\"op\":\"put\",\"kind\":\"message\",\"id\":\"m1\",\"data\":{\"role\":\"user\"}}\n{\"op\":\"put\",\"kind\":\"part\",\"id\":\"p1\",\"parent\":\"m1\",\"data\":\"hi\"}\n").unwrap();
        let (ok, _, stderr) = run(&["push", &owner, "--file", ops.to_str().unwrap()], &outbox, &ca);
        assert!(ok, "{stderr}");
        client_logs.push_str(&stderr);
        let (ok, pulled, stderr) = run(&["pull", reader.trim(), "--json"], &dir.path().join("reader.db"), &ca);
        assert!(ok, "{stderr}");
        client_logs.push_str(&stderr);
        let pulled: serde_json::Value = serde_json::from_str(&pulled).unwrap();
        assert_eq!(pulled["cursor"], 2);
        assert_eq!(pulled["entities"].as_array().unwrap().len(), 2);

        // A CA that did not sign the server's certificate: the handshake is refused.
        let (ok, _, stderr) = run(&["pull", reader.trim()], &dir.path().join("other.db"), &other_ca);
        assert!(!ok);
        let last = stderr.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("capsync: error: TLS with 127.0.0.1") && last.contains("certificate"), "{last}");
        // Plain TCP to a TLS server gets nowhere either.
        let plain = reader.trim().replacen("capsyncs://", "capsync://", 1);
        let out = Command::new(BIN).args(["pull", &plain, "--outbox"]).arg(dir.path().join("plain.db")).output().unwrap();
        assert!(!out.status.success());

        let secrets: Vec<_> = [&owner, reader.trim(), admin_uri.trim()]
            .iter()
            .map(|u| capsync_schema::SturdyUri::parse(u).unwrap().token)
            .collect();
        assert_no_tokens(&server.log_text(), &secrets, "the server log");
        assert!(client_logs.contains("TRACE"), "the clients logged at trace");
        assert_no_tokens(&client_logs, &secrets, "the clients' trace logs");
    }

    #[test]
    fn serve_refuses_plain_tcp_beyond_loopback_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("without TLS") && stderr.contains("--insecure-plaintext"), "{stderr}");
        assert!(!dir.path().join("data").exists(), "nothing was created");

        let server = Server::start_with_args(&dir.path().join("data"), &["--insecure-plaintext"]);
        let _ = server;
    }

    /// The warning about clear-text tokens is for plain TCP on every interface, never for TLS.
    #[test]
    fn only_plain_tcp_on_every_interface_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cert, key) = make_pki(dir.path(), "localhost");
        for (name, extra) in [("tls", vec!["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]), ("plain", vec!["--insecure-plaintext"])] {
            let data = dir.path().join(name);
            let mut child = Command::new(BIN)
                .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
                .arg(&data)
                .args(&extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
            assert!(line.starts_with("capsync listening on 0.0.0.0:"), "{line}");
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            let warned = String::from_utf8_lossy(&out.stderr).contains("without TLS");
            assert_eq!(warned, name == "plain", "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
