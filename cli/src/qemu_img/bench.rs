//! `qemu-img bench`: COUNT equal read (or, with `-w`, write) requests of BUFFER_SIZE bytes on
//! an image, timed, through the engine's own read and write paths (no qemu).
//!
//! The requests are qemu-img's: the first at OFFSET, each next one STEP_SIZE further (BUFFER_SIZE
//! when 0), the offset wrapping to the start at the image's end (`(offset + step) mod size`); a
//! request that reaches past the end fails as qemu-img's does ("Failed request: Input/output
//! error", exit 1). Writes fill their buffer with the `--pattern` byte.
//!
//! Depth: reads run on up to DEPTH threads sharing the one opened chain (the engine's readers
//! take `&self`), at most [`THREADS_MAX`] and as many as keep their buffers within
//! [`BUFFERS_MAX`] bytes. Writes run one after another: the engine's writers take `&mut self`,
//! and every write goes through the same locked path (qemu's image locks, the registry guards)
//! as any other cowclone write. `--flush-interval N` flushes after every N completed writes
//! (`--no-drain` is accepted: serial writes leave nothing in flight to drain). `-t` and `-i`
//! are checked as qemu-img checks them and change no I/O; `-n` (native AIO) needs a direct
//! cache mode (`-t none` or `directsync`), as in qemu-img. The image is flushed before the run
//! is reported complete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::{self, ChainOptions};
use imagefmt::extent::GuestRead;
use imagefmt::io::Backend;
use imagefmt::offsets::GuestOffset;
use imagefmt::ImageFormat;

use super::getopt::Spec;
use super::{error, parse_options, target, usage, Failure};

/// Reader threads at most, whatever `-d` says.
pub const THREADS_MAX: u64 = 64;
/// The reader threads' buffers together stay within this many bytes.
pub const BUFFERS_MAX: u64 = 256 << 20;

/// qemu-img bench's options (qemu-img 10.0.2's option table).
const BENCH: Spec = Spec {
    short: "hc:d:f:ni:o:qs:S:t:wU",
    long: &[
        ("help", false, "h"),
        ("format", true, "f"),
        ("image-opts", false, "image-opts"),
        ("cache", true, "t"),
        ("count", true, "c"),
        ("depth", true, "d"),
        ("offset", true, "o"),
        ("buffer-size", true, "s"),
        ("step-size", true, "S"),
        ("aio", true, "i"),
        ("native", false, "n"),
        ("write", false, "w"),
        ("pattern", true, "pattern"),
        ("flush-interval", true, "flush-interval"),
        ("no-drain", false, "no-drain"),
        ("force-share", false, "U"),
    ],
};

const INT_MAX: i128 = i32::MAX as i128;

/// What one bench run does.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    count: u64,
    depth: u64,
    offset: u64,
    buffer_size: u64,
    step: u64,
    pattern: u8,
    flush_interval: u64,
    write: bool,
    format: Option<String>,
    force_share: bool,
    direct: bool,
    native: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            count: 75_000,
            depth: 64,
            offset: 0,
            buffer_size: 4096,
            step: 0,
            pattern: 0,
            flush_interval: 0,
            write: false,
            format: None,
            force_share: false,
            direct: false,
            native: false,
        }
    }
}

/// Runs `qemu-img bench ARGS`, writing its report to `out`; the exit code.
pub(super) fn run(args: &[String], out: &mut impl Write) -> Result<u8, Failure> {
    let parsed = parse_options(&BENCH, "bench", args)?;
    let mut s = Settings::default();
    for opt in &parsed.opts {
        let value = opt.value.as_deref().unwrap_or_default();
        match opt.key {
            "c" => s.count = integer("request count", value, 1, INT_MAX)? as u64,
            "d" => s.depth = integer("queue depth", value, 1, INT_MAX)? as u64,
            "f" => s.format = Some(value.to_owned()),
            "n" => s.native = true,
            "i" => match value {
                "threads" => s.native = false,
                "native" => s.native = true,
                "io_uring" => s.native = false,
                other => return Err(error(format!("Invalid aio option: {other}"))),
            },
            "o" => s.offset = size_option("offset", value)?,
            "s" => s.buffer_size = size("buffer size", value, 1, INT_MAX)?,
            "S" => s.step = size("step size", value, 0, INT_MAX)?,
            "t" => {
                super::cache_mode("t", value).map_err(|_| error("Invalid cache mode"))?;
                s.direct = matches!(value, "none" | "off" | "directsync");
            }
            "w" => s.write = true,
            "U" => s.force_share = true,
            "pattern" => s.pattern = integer("pattern byte", value, 0, 255)? as u8,
            "flush-interval" => {
                s.flush_interval = integer("flush interval", value, 0, INT_MAX)? as u64
            }
            _ => {}
        }
    }
    let [name] = parsed.operands.as_slice() else {
        return Err(usage("Expecting one image file name"));
    };
    if !s.write && s.flush_interval > 0 {
        return Err(error("--flush-interval is only available in write tests"));
    }
    if s.flush_interval > 0 && s.flush_interval < s.depth {
        return Err(error("Flush interval can't be smaller than depth"));
    }
    let image = target(name, parsed.has("image-opts"))?;
    if s.format.is_none() {
        s.format = image.format.clone();
    }
    let path = PathBuf::from(&image.path);
    let could_not_open = |why: &str| error(format!("Could not open '{name}': {why}"));
    if s.native && !s.direct {
        return Err(could_not_open(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    if s.write && s.force_share {
        return Err(could_not_open(
            "force-share=on can only be used with read-only images",
        ));
    }
    let format = match s.format.as_deref() {
        None => None,
        Some(text) => Some(
            text.parse::<ImageFormat>()
                .map_err(|_| could_not_open(&format!("Unknown driver '{text}'")))?,
        ),
    };
    let mut device = Device::open(&path, format, &s).map_err(|e| open_failure(name, e))?;
    if s.step == 0 {
        s.step = s.buffer_size;
    }
    let mut report = format!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
        s.count,
        if s.write { "write" } else { "read" },
        s.buffer_size,
        s.depth,
        s.offset,
        s.step
    );
    if s.flush_interval > 0 {
        report.push_str(&format!(
            "Sending flush every {} requests\n",
            s.flush_interval
        ));
    }
    out.write_all(report.as_bytes())
        .map_err(|e| error(e.to_string()))?;
    let started = Instant::now();
    let ran = device.run(&s);
    let _ = out.flush();
    ran.map_err(|why| error(format!("Failed request: {why}")))?;
    let seconds = started.elapsed().as_secs_f64();
    writeln!(out, "Run completed in {seconds:.3} seconds.").map_err(|e| error(e.to_string()))?;
    Ok(0)
}

/// An open failure in qemu-img's words (the personality's one translation of engine errors).
fn open_failure(name: &str, e: anyhow::Error) -> Failure {
    let message = super::message("bench", &e);
    if message.starts_with("Could not open") {
        error(message)
    } else {
        error(format!("Could not open '{name}': {message}"))
    }
}

/// The image the requests go to.
enum Device {
    /// Reads: the whole chain, shared by the reader threads.
    Read(Box<dyn GuestRead>),
    /// Writes into a qcow2 image (copy-on-write from its backing chain).
    Qcow2(Box<imagefmt::qcow2::image::Qcow2Image<std::fs::File>>),
    /// Writes into a VDI image.
    Vdi(Box<imagefmt::vdi::VdiImage<std::fs::File>>),
    /// Writes into a raw image.
    Raw(std::fs::File, u64),
}

impl Device {
    fn open(path: &Path, format: Option<ImageFormat>, s: &Settings) -> anyhow::Result<Self> {
        let policy = BackingPolicy::FollowLocal;
        let mut options = ChainOptions::new(&policy);
        options.force_share = s.force_share;
        if !s.write {
            return Ok(Device::Read(chain::open_chain_with(
                path, format, &options,
            )?));
        }
        crate::commands::registry::WriteGuardArgs {
            home: None,
            force_registered_write: false,
        }
        .check("bench", &[path.to_owned()])?;
        let detected = match format {
            Some(format) => format,
            None => {
                let how = imagefmt::open::OpenHow::reading(true);
                imagefmt::image::read_file_header_with(path, how)?
                    .1
                    .format()
            }
        };
        Ok(match detected {
            ImageFormat::Qcow2 => Device::Qcow2(Box::new(chain::open_qcow2_rw(
                path,
                &policy,
                Default::default(),
            )?)),
            ImageFormat::Vdi => Device::Vdi(Box::new(chain::open_vdi_rw(path, &options, false)?)),
            _ => {
                if format.is_none() {
                    // qemu-img's warning for a raw image it opens for writing by probing. Its
                    // restriction (no write to block 0 that would make the image probe as
                    // another format) cannot apply: the requests repeat one byte.
                    eprintln!(
                        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
                         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                         Specify the 'raw' format explicitly to remove the restrictions.",
                        path.display()
                    );
                }
                let file = imagefmt::open::open_image(path, imagefmt::open::OpenHow::write())?;
                let len = Backend::len(&file)?;
                Device::Raw(file, len)
            }
        })
    }

    fn size(&self) -> u64 {
        match self {
            Device::Read(chain) => chain.virtual_size(),
            Device::Qcow2(image) => image.virtual_size(),
            Device::Vdi(image) => image.virtual_size(),
            Device::Raw(_, len) => *len,
        }
    }

    /// Sends every request; the first failure, as qemu-img reports it.
    fn run(&mut self, s: &Settings) -> Result<(), String> {
        let size = self.size();
        let requests = Requests::new(s, size);
        if let Device::Read(chain) = self {
            return read_all(chain.as_ref(), &requests, s);
        }
        let buf = buffer(s.buffer_size, s.pattern)?;
        let eio = || "Input/output error".to_owned();
        for (done, offset) in (0..s.count).map(|i| (i + 1, requests.offset(i))) {
            if !requests.inside(offset) {
                return Err(eio());
            }
            let written = match self {
                Device::Qcow2(image) => image.write_at(&buf, offset),
                Device::Vdi(image) => image.write_at(&buf, offset),
                Device::Raw(file, _) => Backend::write_all_at(file, &buf, offset)
                    .map_err(imagefmt::Error::writing("raw image data")),
                Device::Read(_) => unreachable!("reads returned above"),
            };
            written.map_err(|e| e.to_string())?;
            if s.flush_interval > 0 && done % s.flush_interval == 0 {
                self.flush().map_err(|e| format!("flush: {e}"))?;
            }
        }
        self.flush().map_err(|e| format!("flush: {e}"))
    }

    fn flush(&mut self) -> imagefmt::Result<()> {
        match self {
            Device::Qcow2(image) => image.flush(),
            Device::Vdi(image) => image.flush(),
            Device::Raw(file, _) => {
                Backend::sync_all(file).map_err(imagefmt::Error::writing("raw image"))
            }
            Device::Read(_) => Ok(()),
        }
    }
}

/// The request offsets of a run: qemu-img's sequence.
struct Requests {
    first: u64,
    step: u64,
    len: u64,
    size: u64,
}

impl Requests {
    fn new(s: &Settings, size: u64) -> Self {
        Requests {
            first: s.offset,
            step: s.step,
            len: s.buffer_size,
            size,
        }
    }

    /// The offset of request `i`: the first at OFFSET as given, each next one STEP further,
    /// wrapped at the image's end (all at 0 in an empty image).
    fn offset(&self, i: u64) -> u64 {
        match (i, self.size) {
            (0, _) => self.first,
            (_, 0) => 0,
            _ => {
                ((u128::from(self.first) + u128::from(i) * u128::from(self.step))
                    % u128::from(self.size)) as u64
            }
        }
    }

    /// Whether a request at `offset` lies inside the image (else it fails with EIO).
    fn inside(&self, offset: u64) -> bool {
        offset
            .checked_add(self.len)
            .is_some_and(|end| end <= self.size)
    }
}

/// A request buffer of `len` bytes of `pattern`; an allocation failure is an error.
fn buffer(len: u64, pattern: u8) -> Result<Vec<u8>, String> {
    let len = usize::try_from(len).map_err(|_| "Cannot allocate memory".to_owned())?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| "Cannot allocate memory".to_owned())?;
    buf.resize(len, pattern);
    Ok(buf)
}

/// Runs the read requests on reader threads that take the next request number in turn.
fn read_all(chain: &dyn GuestRead, requests: &Requests, s: &Settings) -> Result<(), String> {
    let threads = s
        .depth
        .min(s.count)
        .min(THREADS_MAX)
        .min((BUFFERS_MAX / s.buffer_size).max(1));
    let next = AtomicU64::new(0);
    let reader = || -> Result<(), String> {
        let mut buf = buffer(s.buffer_size, 0)?;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= s.count {
                return Ok(());
            }
            let offset = requests.offset(i);
            if !requests.inside(offset) {
                next.store(s.count, Ordering::Relaxed);
                return Err("Input/output error".to_owned());
            }
            if let Err(e) = chain.read_at(&mut buf, GuestOffset(offset)) {
                next.store(s.count, Ordering::Relaxed);
                return Err(e.to_string());
            }
        }
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads).map(|_| scope.spawn(reader)).collect();
        let mut result = reader();
        for handle in handles {
            let joined = handle
                .join()
                .unwrap_or_else(|_| Err("a reader thread panicked".to_owned()));
            result = result.and(joined);
        }
        result
    })
}

/// An integer option as qemu-img reads it (C's strtoul, base 0: `0x` hex, leading-0 octal,
/// optional sign and leading blanks), within `min..=max`; errors worded as qemu-img's.
fn integer(what: &str, text: &str, min: i128, max: i128) -> Result<i128, Failure> {
    let value = imagefmt::size::parse_c_integer(text)
        .ok_or_else(|| error(format!("Invalid {what} specified: '{text}'.")))?;
    in_range(what, value, min, max)
}

/// A size option as qemu-img reads it (suffixes k, M, G, ...), within `min..=max`.
fn size(what: &str, text: &str, min: i128, max: i128) -> Result<u64, Failure> {
    crate::commands::qemu_size_between(what, text, min, max).map_err(|e| error(e.to_string()))
}

/// A byte count option of qemu-img (a rate limit, an offset): a size from 0 to `i64::MAX`,
/// refused in qemu-img's words.
pub(super) fn size_option(what: &str, text: &str) -> Result<u64, Failure> {
    size(what, text, 0, i128::from(i64::MAX))
}

fn in_range(what: &str, value: i128, min: i128, max: i128) -> Result<i128, Failure> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(error(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_at_the_end_as_qemu_img_s() {
        let s = Settings {
            offset: 1040384,
            step: 4096,
            ..Settings::default()
        };
        let requests = Requests::new(&s, 1 << 20);
        let offsets: Vec<_> = (0..4).map(|i| requests.offset(i)).collect();
        assert_eq!(offsets, [1040384, 1044480, 0, 4096]);
        assert!(!Requests::new(&s, 0).inside(0));
        let past = Settings {
            offset: 2 << 20,
            step: 4096,
            ..Settings::default()
        };
        assert_eq!(Requests::new(&past, 1 << 20).offset(0), 2 << 20);
        assert_eq!(Requests::new(&past, 1 << 20).offset(1), 4096);
    }

    #[test]
    fn integers_are_read_as_strtoul_reads_them() {
        let read = |t| integer("request count", t, 1, INT_MAX).map_err(|_| ());
        assert_eq!(read("010"), Ok(8));
        assert_eq!(read("0x10"), Ok(16));
        assert_eq!(read(" +5"), Ok(5));
        assert!(read("10k").is_err());
        assert!(read("").is_err());
        assert!(read("-1").is_err());
        assert!(read("0").is_err());
    }
}
