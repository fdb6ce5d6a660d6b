//! Release builds of the `ztunnel` binary link the functions that run at start-up and on the
//! data path first, in one block ([`ORDER`], read by lld's `--symbol-ordering-file`), and pack
//! relative relocations (`-z pack-relative-relocs`, glibc 2.36+). The kernel maps a binary's code
//! 64 KiB at a time around every page touched; scattered, the few hundred KiB that run kept
//! about 5.5 MiB of code resident in an idle ztunnel (bench/README.md, History, "Idle memory").
//! Regenerate the list with `bash bench/link-order.sh`; names it no longer finds are skipped.

const ORDER: &str = "link-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-changed=build.rs");
    // "release" for every profile that inherits from release (bench does).
    if std::env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = std::path::Path::new(&dir).join(ORDER);
    println!(
        "cargo:rustc-link-arg-bin=ztunnel=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,--no-warn-symbol-ordering");
    println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,-z,pack-relative-relocs");
}
