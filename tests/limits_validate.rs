//! `sluice validate` on the byte-limit keys (SPEC §10): units and ranges are checked where they are
//! written, in policies and in the server's `[limits]`, with file:line:col and a hint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-limits-validate-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, relative: &str, text: &str) {
        std::fs::write(self.0.join(relative), text).expect("write file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `sluice validate ARGS` in `dir`: (exit code, stdout).
fn validate(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("validate")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run sluice");
    (out.status.code().expect("exit code"), String::from_utf8(out.stdout).expect("utf-8 stdout"))
}

#[test]
fn good_byte_limits_validate_cleanly() {
    let dir = TempDir::new();
    dir.write(
        "policies/p.toml",
        "version = 1\nname = \"p\"\nlevel = \"trusted\"\n[limits]\nupload_bytes_per_second = \"10MiB\"\ndownload_bytes_per_second = \"100MiB\"\nupload_quota = \"2GiB/hour\"\ndownload_quota = \"50GiB/day\"\n",
    );
    dir.write("sluice.toml", "[limits]\nupload_bytes_per_second = \"1KiB\"\ndownload_quota = \"1TB/day\"\n");
    assert_eq!(validate(&dir.0, &[]), (0, "checked 1 file: 0 errors, 0 warnings\n".to_string()));
    assert_eq!(validate(&dir.0, &["sluice.toml"]), (0, "checked 1 file: 0 errors, 0 warnings\n".to_string()));
}

#[test]
fn every_bad_byte_limit_in_a_policy_is_named_where_it_is_written() {
    let dir = TempDir::new();
    dir.write(
        "policies/p.toml",
        "version = 1\nname = \"p\"\nlevel = \"trusted\"\n[limits]\nupload_bytes_per_second = \"10Mb\"\ndownload_bytes_per_second = \"512B\"\nupload_quota = \"2GiB\"\ndownload_quota = \"1GiB/week\"\n",
    );
    let expected = "\
policies/p.toml:5:27: error: upload_bytes_per_second: invalid size \"10Mb\": unknown unit \"Mb\"
  |
5 | upload_bytes_per_second = \"10Mb\"
  |                           ^^^^^^
  = hint: did you mean \"MB\"? sluice counts bytes; units are B, KiB, MiB, GiB, TiB (powers of 1024) and KB, MB, GB, TB (powers of 1000), e.g. \"10MiB\"

policies/p.toml:6:29: error: download_bytes_per_second must be at least 1KiB per second, not 512B
  |
6 | download_bytes_per_second = \"512B\"
  |                             ^^^^^^
  = hint: a slower rate stalls every tunnel; e.g. download_bytes_per_second = \"10MiB\"

policies/p.toml:7:16: error: upload_quota: invalid quota \"2GiB\": expected SIZE/PERIOD
  |
7 | upload_quota = \"2GiB\"
  |                ^^^^^^
  = hint: e.g. \"2GiB/hour\"; periods are second, minute, hour and day

policies/p.toml:8:18: error: download_quota: invalid quota \"1GiB/week\": unknown period \"week\"
  |
8 | download_quota = \"1GiB/week\"
  |                  ^^^^^^^^^^^
  = hint: periods are second, minute, hour and day, e.g. \"2GiB/hour\"

checked 1 file: 4 errors, 0 warnings
";
    assert_eq!(validate(&dir.0, &[]), (1, expected.to_string()));
    // Sizes are integers of bytes: a number where a string belongs is refused by TOML's type.
    dir.write("policies/p.toml", "version = 1\nname = \"p\"\nlevel = \"trusted\"\n[limits]\nupload_quota = 5\n");
    let (code, out) = validate(&dir.0, &[]);
    assert_eq!(code, 1);
    assert!(out.starts_with("policies/p.toml:5:16: error: "), "{out}");
}

#[test]
fn bad_server_defaults_are_named_where_they_are_written() {
    let dir = TempDir::new();
    for (text, expected) in [
        (
            "[limits]\nburst = 5\ndownload_bytes_per_second = \"512B\"\n",
            "s.toml:3:29: error: a shaping rate must be at least 1KiB per second, not 512B (slower stalls every tunnel; e.g. \"10MiB\")\n  |\n3 | download_bytes_per_second = \"512B\"\n  |                             ^^^^^^\n",
        ),
        (
            "[limits]\nupload_quota = \"2GiB/hours\"\n",
            "s.toml:2:16: error: invalid quota \"2GiB/hours\": unknown period \"hours\" (did you mean \"hour\"? periods are second, minute, hour and day)\n  |\n2 | upload_quota = \"2GiB/hours\"\n  |                ^^^^^^^^^^^^\n",
        ),
        (
            "[limits]\nupload_bytes_per_second = \"100\"\n",
            "s.toml:2:27: error: invalid size \"100\": expected a unit after the number (write \"100B\" for bytes, or use a larger unit)\n  |\n2 | upload_bytes_per_second = \"100\"\n  |                           ^^^^^\n",
        ),
    ] {
        dir.write("s.toml", text);
        let (code, out) = validate(&dir.0, &["s.toml"]);
        assert_eq!((code, out), (1, format!("{expected}\nchecked 1 file: 1 error, 0 warnings\n")), "{text}");
    }
}
