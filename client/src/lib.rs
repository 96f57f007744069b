//! The Guild merchant client: everything that runs next to a merchant's own data.
//!
//! It connects to the coordinator, trains adapters locally with libtorch, privatises the
//! update and takes part in secure aggregation. Nothing leaves this process except
//! through the protocol in `guild-proto`.

pub mod config;
pub mod data;
pub mod faults;
pub mod identity;
pub mod learner;
pub mod ledger;
pub mod model;
pub mod net;
pub mod participant;
pub mod retrieval;
pub mod serve;

/// The device local training runs on: the first CUDA GPU when there is one, else the CPU.
pub fn training_device() -> tch::Device {
    tch::Device::cuda_if_available()
}

/// Keeps the C allocator, which libtorch's tensors and Rust's buffers both use, from holding
/// memory that was freed, by giving it at most two arenas. With glibc's default (eight
/// arenas per core), a process whose many threads allocate and free update buffers of
/// several MiB and score batches against the catalogue keeps several times the memory it
/// uses: a simulated federation (three federated rounds, then a shopper-level release and
/// selection; `/usr/bin/time -v`) peaked at 3.8 GB with the default and 2.4 GB with two
/// arenas, and ran faster (128 s against 166 s). Also mapping every block of 1 MiB or more
/// on its own brought the peak to 1.5 GB, but made the run 50% slower (page faults on every
/// large tensor). Call it first in `main`, before any thread starts.
pub fn bound_allocator_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, and the parameters are valid for glibc (a failure leaves the defaults).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// For a process that scores whole evaluation sets (the simulator): keeps the large buffers
/// it allocates and frees over and over in the allocator's heap instead of handing them
/// back to the kernel and faulting them in again page by page. glibc maps a block above its
/// mmap threshold on its own and returns a heap's free top above its trim threshold; both
/// start low (128 KiB) and rise only as such blocks are freed, so the scoring loops' batches
/// (17 MB each, hundreds a run) went back to the kernel every time. Fixing the thresholds at
/// 32 MiB (glibc's own ceiling for the rising one) and 128 MiB: the default scenario's
/// untrained and centralised arms, back to back (`/usr/bin/time`), 7.8 M minor page faults,
/// 22 s of system time and 172 s of wall time before, 3.3 M, 7 s and 139 s after, at 30 MB
/// more peak memory. Not for `guild-client`: its serving benchmark answered a lone
/// recommendation about 20% slower with these thresholds (p50 3.0–3.3 ms against 2.3–2.7,
/// two runs of each back to back), and a merchant's own evaluation is a few hundred shoppers.
/// Call it first in `main`, before any thread starts.
pub fn keep_large_buffers_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: as in `bound_allocator_memory`: allocator parameters only, set before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB; NaN elsewhere.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), with colours only when
/// stderr is a terminal, so that a log piped to a file stays plain text.
pub fn init_logging(default_filter: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
