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
/// memory that was freed, by giving it at most two arenas, and from handing the same large
/// buffers back to the kernel and faulting them in again page by page.
///
/// Arenas: with glibc's default (eight per core), a process whose many threads allocate and
/// free update buffers of several MiB and score batches against the catalogue keeps several
/// times the memory it uses: a simulated federation (three federated rounds, then a
/// shopper-level release and selection; `/usr/bin/time -v`) peaked at 3.8 GB with the
/// default and 2.4 GB with two arenas, and ran faster (128 s against 166 s).
///
/// Thresholds: glibc maps a block above its mmap threshold on its own and returns a heap's
/// free top above its trim threshold; both start low (128 KiB) and rise only as such blocks
/// are freed, so the scoring loops' batches (17–35 MB each, allocated and freed hundreds of
/// times a run) went back to the kernel and were faulted in again every time. Fixing them
/// at 32 MiB (glibc's own ceiling for the rising threshold) and 128 MiB keeps those
/// buffers in the heap. The default scenario's untrained and centralised arms, back to back
/// (`/usr/bin/time`): 7.8 M minor page faults, 22 s of system time and 172 s of wall time
/// before, 3.3 M, 7 s and 139 s after, at 30 MB more peak memory. (Mapping every block of
/// 1 MiB or more on its own instead brought the first run's peak to 1.5 GB but made it 50%
/// slower.) Call it first in `main`, before any thread starts.
pub fn bound_allocator_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, and the parameters are valid for glibc (a failure leaves the defaults).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
