//! NDJSON: one [`Record`] per line, straight into a buffered writer; and the agent's event
//! file, rotated by size.

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use crate::{event::Record, pipeline::Sink};

/// Writes one record as one line.
pub fn write_record(out: &mut impl Write, r: &Record) -> io::Result<()> {
    serde_json::to_writer(&mut *out, r).map_err(io::Error::from)?;
    out.write_all(b"\n")
}

/// `watch --json`, `record` and the agent's event file.
pub struct NdjsonSink<W: Write> {
    pub out: W,
}

impl<W: Write> Sink for NdjsonSink<W> {
    fn record(&mut self, r: &Record) -> io::Result<()> {
        write_record(&mut self.out, r)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// NDJSON events, rotated to `PATH.1` once past the size (only on flush, between drains, so a
/// line is never split across files).
pub struct RotatingFile {
    path: PathBuf,
    max: u64,
    file: BufWriter<File>,
    written: u64,
}

impl RotatingFile {
    pub fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max,
            file: BufWriter::new(file),
            written,
        })
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.written > self.max {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            fs::rename(&self.path, &rotated)?;
            *self = Self::open(&self.path, self.max)?;
        }
        Ok(())
    }
}

/// The agent's event file: sees every record; a write error is logged once, never fatal.
pub struct EventFileSink {
    file: RotatingFile,
    failed: bool,
}

impl EventFileSink {
    pub fn new(file: RotatingFile) -> Self {
        Self {
            file,
            failed: false,
        }
    }

    fn note(&mut self, r: io::Result<()>) {
        if let Err(e) = r {
            if !self.failed {
                tracing::error!("writing the event file: {e}");
            }
            self.failed = true;
        }
    }
}

impl Sink for EventFileSink {
    fn record(&mut self, r: &Record) -> io::Result<()> {
        let res = write_record(&mut self.file, r);
        self.note(res);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let res = self.file.flush();
        self.note(res);
        Ok(())
    }

    fn wants_all(&self) -> bool {
        true
    }
}
