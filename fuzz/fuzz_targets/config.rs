//! The configuration file: any text is a config or a clean error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nixpush::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/nixpush/config.toml");
    if let Ok(cfg) = Config::parse(path, text) {
        // What the daemon derives from a valid config must not panic either.
        let _ = cfg.socket_mode();
        let _ = cfg.rescan_interval();
        let _ = cfg.resolved_key_files(path);
    }
});
