//! Compiles the LD_PRELOAD shim (C, glibc) into a shared library and tells
//! the crate where it is.

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=shim/powercut.c");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib = out.join("libbridgekeys_powercut.so");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-O2", "-Wall", "-Wno-format-truncation", "-shared", "-fPIC"])
        .arg("-o")
        .arg(&lib)
        .arg("shim/powercut.c")
        .args(["-ldl", "-lpthread"])
        .status()
        .unwrap_or_else(|e| {
            panic!("could not run the C compiler `{cc}` for the powercut shim: {e}")
        });
    assert!(status.success(), "compiling shim/powercut.c failed");
    println!("cargo:rustc-env=BRIDGEKEYS_POWERCUT_SHIM={}", lib.display());
}
