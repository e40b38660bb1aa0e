//! `lbtrace record`: the record stream into a file (NDJSON with a header) for `diagnose`,
//! `timeline` and `report`.

use std::{
    fs,
    io::{self, BufWriter, Write},
    path::Path,
};

use lbtrace::{
    event::Record,
    output::ndjson::{write_record, NdjsonSink},
    pipeline::Stop,
};

use super::{
    common::{trace, UsageError},
    WatchArgs,
};

pub fn record(output: &Path, args: WatchArgs) -> anyhow::Result<()> {
    let file = fs::File::create(output)
        .map_err(|e| UsageError(format!("cannot create {}: {e}", output.display())))?;
    let mut sink = NdjsonSink {
        out: BufWriter::new(file),
    };
    let (summary, _) = trace(&args, vec![&mut sink], true, &Stop::new())?;
    write_record(&mut sink.out, &Record::Summary(Box::new(summary.clone())))?;
    sink.out.flush()?;
    summary.write_text(&mut io::stderr())?;
    eprintln!("lbtrace: recorded to {}", output.display());
    Ok(())
}
