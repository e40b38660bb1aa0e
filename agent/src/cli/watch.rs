//! `lbtrace watch`: dropped packets live, one line (or NDJSON record) each, then a summary.

use std::io::{self, BufWriter, Write};

use lbtrace::{
    event::Record,
    output::{ndjson::write_record, ndjson::NdjsonSink, text::TextSink},
    pipeline::Stop,
};

use super::{
    common::{colour, trace},
    WatchArgs,
};

pub fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let stop = Stop::new();
    if args.json {
        let mut sink = NdjsonSink { out };
        let (summary, closed) = trace(&args, vec![&mut sink], false, &stop)?;
        if !closed {
            write_record(&mut sink.out, &Record::Summary(Box::new(summary)))?;
            sink.out.flush()?;
        }
        return Ok(());
    }
    let mut sink = TextSink {
        out,
        colour: colour(&args),
    };
    let (summary, closed) = trace(&args, vec![&mut sink], false, &stop)?;
    if !closed {
        // The summary goes where a person reads it even when events are piped away.
        let _ = sink.out.flush();
        summary.write_text(&mut io::stderr())?;
    }
    Ok(())
}
