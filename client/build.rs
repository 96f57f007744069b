//! Gives this crate's binaries and tests an rpath to the libtorch they link, so they run
//! without LD_LIBRARY_PATH (torch-sys publishes the folder as DEP_TCH_LIBTORCH_LIB). The
//! first entry, `$ORIGIN/libtorch/lib`, is beside the binary: a `guild-client` copied to a
//! merchant's machine with libtorch's `lib` folder in `libtorch/lib` next to it runs there
//! (the build tree's folder, the second entry, does not exist on that machine).

fn main() {
    println!("cargo::rustc-link-arg=-Wl,-rpath,$ORIGIN/libtorch/lib");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo::rustc-link-arg=-Wl,-rpath,{lib}");
        // For the test that runs a copied binary against a copy of this folder.
        println!("cargo::rustc-env=GUILD_BUILD_LIBTORCH_LIB={lib}");
    }
}
