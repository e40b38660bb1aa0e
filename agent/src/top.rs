//! `lbtrace top`: a full-screen live view of the VIPs: drops/s sparklines, top reasons, current
//! owner and last failover, and the leading finding. Keys: ↑/↓ or j/k select, / filter,
//! p pause, q (or Esc, Ctrl-C) quit. The terminal is restored on every exit, panics included.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{self, Write},
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lbtrace::analysis::Analyzer;
use ratatui::{
    crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style, Stylize},
    text::Line,
    widgets::{Block, Paragraph, Row, Table, TableState},
    Frame,
};
use serde_json::Value;

use crate::{cmd::run_watch, WatchArgs};

/// Seconds of history in a sparkline.
const SPARK_SECS: u64 = 30;
/// Recent lines kept per VIP for the detail pane.
const RECENT: usize = 12;

/// What the watch pipeline feeds: every JSON record, analysed as it comes.
#[derive(Default)]
struct State {
    analyzer: Analyzer,
    recent: BTreeMap<String, VecDeque<String>>,
    partial: Vec<u8>,
    probe: String,
}

/// A writer for `run_watch`: parses each NDJSON line into the shared state.
struct Feed(Arc<Mutex<State>>);

impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        st.partial.extend_from_slice(buf);
        while let Some(pos) = st.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = st.partial.drain(..=pos).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if v["kind"] == "status" {
                st.probe = v["probe"].as_str().unwrap_or("?").to_owned();
            }
            st.analyzer.add(&v);
            if let Some(vip) = v["vip"].as_str() {
                let text = describe(&v);
                let q = st.recent.entry(vip.to_owned()).or_default();
                q.push_back(text);
                if q.len() > RECENT {
                    q.pop_front();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn describe(v: &Value) -> String {
    let time = v["time"].as_str().unwrap_or("");
    let time = time.get(11..23).unwrap_or(time);
    match v["kind"].as_str().unwrap_or("") {
        "drop" | "conntrack" => format!(
            "{time} {} {} {}:{} -> {}:{} netns {}",
            v["event"]
                .as_str()
                .unwrap_or(v["reason"].as_str().unwrap_or("?")),
            v["proto"].as_str().unwrap_or("-"),
            v["src"].as_str().unwrap_or("-"),
            v["sport"],
            v["dst"].as_str().unwrap_or("-"),
            v["dport"],
            v["netns"]
        ),
        "arp" => format!(
            "{time} {}{} {} {} is-at {}",
            if v["gratuitous"] == true { "GARP " } else { "" },
            v["direction"].as_str().unwrap_or(""),
            v["op"].as_str().unwrap_or(""),
            v["sender_ip"].as_str().unwrap_or("-"),
            v["sender_mac"].as_str().unwrap_or("-")
        ),
        "vip_owner" => format!(
            "{time} OWNER {} -> {}",
            v["old_mac"].as_str().unwrap_or("none"),
            v["new_mac"].as_str().unwrap_or("?")
        ),
        "neigh" => format!(
            "{time} NEIGH {} {} -> {} {}",
            v["old_mac"].as_str().unwrap_or("-"),
            v["old_state"].as_str().unwrap_or(""),
            v["new_mac"].as_str().unwrap_or("-"),
            v["new_state"].as_str().unwrap_or("")
        ),
        other => format!("{time} {other}"),
    }
}

fn sparkline(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|v| match (*v, max) {
            (0, _) => ' ',
            (v, m) => BARS[((v * 7) / m.max(1)) as usize],
        })
        .collect()
}

struct View {
    selected: usize,
    filter: String,
    editing_filter: bool,
    paused: Option<Vec<[String; 7]>>,
}

/// One table row per VIP: vip, sparkline, drops/s, total, top reason, owner, last move, finding.
fn rows(st: &State, now: u64) -> Vec<[String; 7]> {
    let diagnosis = st.analyzer.diagnose();
    st.analyzer
        .vips()
        .into_iter()
        .map(|vip| {
            let tl = st.analyzer.timeline(&vip);
            let per_sec: Vec<u64> = (now.saturating_sub(SPARK_SECS - 1)..=now)
                .map(|s| tl.and_then(|t| t.fine.get(&s)).map_or(0, |b| b.drops))
                .collect();
            let total = tl.map(|t| t.total()).unwrap_or_default();
            let top = total
                .drops_by_reason
                .iter()
                .max_by_key(|(_, n)| **n)
                .map_or("-".to_owned(), |(r, n)| format!("{r} ({n})"));
            let changes = st.analyzer.changes(&vip);
            let owner = st.analyzer.owner(&vip).unwrap_or_else(|| "-".into());
            let last_move = changes.last().map_or("-".to_owned(), |(t, _, _)| {
                format!("{}s ago", now.saturating_sub(*t as u64))
            });
            let finding = diagnosis
                .iter()
                .find(|d| d["vip"] == vip.as_str())
                .and_then(|d| d["findings"].get(0).cloned())
                .map_or("-".to_owned(), |f| {
                    format!("{} {}", f["cause"].as_str().unwrap_or("?"), f["confidence"])
                });
            [
                vip,
                format!(
                    "{} {}",
                    sparkline(&per_sec),
                    per_sec.last().copied().unwrap_or(0)
                ),
                total.drops.to_string(),
                top,
                owner,
                last_move,
                finding,
            ]
        })
        .collect()
}

fn draw(f: &mut Frame<'_>, st: &State, view: &mut View, rows_now: &[[String; 7]]) {
    let [head, table_area, detail, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(RECENT as u16 + 2),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let status = if view.paused.is_some() {
        " [paused]"
    } else {
        ""
    };
    let filter = if view.filter.is_empty() && !view.editing_filter {
        String::new()
    } else {
        format!(
            " filter: {}{}",
            view.filter,
            if view.editing_filter { "_" } else { "" }
        )
    };
    f.render_widget(
        Paragraph::new(Line::from(format!(
            "lbtrace top — {}{status}{filter}",
            if st.probe.is_empty() {
                "starting".to_owned()
            } else {
                format!("tracing with {}", st.probe)
            }
        )))
        .bold(),
        head,
    );
    let visible: Vec<&[String; 7]> = rows_now
        .iter()
        .filter(|r| view.filter.is_empty() || r[0].contains(&view.filter))
        .collect();
    view.selected = view.selected.min(visible.len().saturating_sub(1));
    let header = Row::new([
        "VIP",
        "drops/s (30 s)",
        "drops",
        "top reason",
        "owner",
        "last move",
        "finding",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(
        visible.iter().map(|r| Row::new(r.iter().cloned())),
        [
            Constraint::Length(18),
            Constraint::Length(36),
            Constraint::Length(8),
            Constraint::Length(24),
            Constraint::Length(18),
            Constraint::Length(10),
            Constraint::Min(10),
        ],
    )
    .header(header)
    .row_highlight_style(Style::new().reversed())
    .block(Block::bordered().title(" VIPs "));
    let mut ts = TableState::default().with_selected(Some(view.selected));
    f.render_stateful_widget(table, table_area, &mut ts);
    let selected = visible.get(view.selected).map(|r| r[0].clone());
    let lines: Vec<Line<'_>> = selected
        .as_ref()
        .and_then(|v| st.recent.get(v))
        .map(|q| q.iter().map(|l| Line::from(l.clone())).collect())
        .unwrap_or_default();
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(format!(
            " recent events: {} ",
            selected.as_deref().unwrap_or("-")
        ))),
        detail,
    );
    f.render_widget(
        Paragraph::new("↑/↓ j/k select  / filter  p pause  q quit").dim(),
        help,
    );
}

/// Restores the terminal (and stderr) however `top` ends.
struct Restore {
    saved_stderr: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
        // SAFETY: restoring fd 2 from the duplicate taken at start.
        unsafe {
            libc::dup2(self.saved_stderr, 2);
            libc::close(self.saved_stderr);
        }
    }
}

pub fn top(args: WatchArgs) -> anyhow::Result<()> {
    let state = Arc::new(Mutex::new(State::default()));
    for v in args.vips.iter().chain(&args.tag_vips) {
        state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .analyzer
            .watch(&v.to_string());
    }
    // Fail before touching the terminal when lbtrace cannot trace at all.
    crate::cmd::require_privileges()?;
    let feed = Feed(state.clone());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = run_watch(&args, feed, true, Some(()));
        let _ = done_tx.send(());
        r
    });
    // Messages on stderr would tear the full-screen view: park them until the end.
    let log = std::fs::File::create("/dev/null")?;
    // SAFETY: duplicating and replacing fd 2; `Restore` puts it back.
    let saved_stderr = unsafe { libc::dup(2) };
    unsafe { libc::dup2(log.as_raw_fd(), 2) };
    let mut terminal = ratatui::try_init()?;
    let restore = Restore { saved_stderr };
    let mut view = View {
        selected: 0,
        filter: String::new(),
        editing_filter: false,
        paused: None,
    };
    let mut finished = false;
    loop {
        if done_rx.try_recv().is_ok() {
            finished = true;
            break;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        {
            let st = state.lock().unwrap_or_else(PoisonError::into_inner);
            let live = rows(&st, now);
            let shown = view.paused.clone().unwrap_or(live);
            terminal.draw(|f| draw(f, &st, &mut view, &shown))?;
        }
        if !event::poll(Duration::from_millis(250))? {
            continue;
        }
        let TermEvent::Key(key) = event::read()? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        if view.editing_filter {
            match key.code {
                KeyCode::Enter | KeyCode::Esc => view.editing_filter = false,
                KeyCode::Backspace => {
                    view.filter.pop();
                }
                KeyCode::Char(c) => view.filter.push(c),
                _ => {}
            }
            continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => break,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => break,
            KeyCode::Down | KeyCode::Char('j') => view.selected += 1,
            KeyCode::Up | KeyCode::Char('k') => view.selected = view.selected.saturating_sub(1),
            KeyCode::Char('/') => view.editing_filter = true,
            KeyCode::Char('p') => {
                view.paused = match view.paused.take() {
                    Some(_) => None,
                    None => {
                        let st = state.lock().unwrap_or_else(PoisonError::into_inner);
                        Some(rows(&st, now))
                    }
                };
            }
            _ => {}
        }
    }
    drop(terminal);
    drop(restore);
    if !finished {
        // The watch ends like on Ctrl-C: detach, drain, summarize.
        // SAFETY: signalling ourselves; the watch's handler takes it.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }
    let (summary, _, _) = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the watch thread panicked"))??;
    summary.write(&mut io::stderr(), false)?;
    Ok(())
}
