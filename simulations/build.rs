//! Gives this crate's binaries and tests an rpath to the libtorch they link, so they run
//! without LD_LIBRARY_PATH (torch-sys publishes the folder as DEP_TCH_LIBTORCH_LIB).

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo::rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
