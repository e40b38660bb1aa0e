//! `lbtrace top`: a full-screen live view of the VIPs: drops/s sparklines, top reasons, current
//! owner and last failover, and the leading finding. Keys: ↑/↓ or j/k select, / filter,
//! p pause, q (or Esc, Ctrl-C) quit. The terminal is restored on every exit, panics included.

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use super::{common::trace, WatchArgs};
use lbtrace::{
    analysis::Analyzer,
    event::Record,
    output::timeline::number,
    pipeline::{Sink, Stop},
};
use ratatui::{
    crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style, Stylize},
    text::Line,
    widgets::{Block, Paragraph, Row, Table, TableState},
    Frame,
};

/// Seconds of history in a sparkline.
const SPARK_SECS: u64 = 30;
/// Recent lines kept per VIP for the detail pane.
const RECENT: usize = 12;

/// What the pipeline feeds: every record, analysed as it comes.
#[derive(Default)]
struct State {
    analyzer: Analyzer,
    recent: BTreeMap<String, VecDeque<String>>,
    probe: String,
}

/// The pipeline's sink for `top`: typed records into the shared state.
struct Feed(Arc<Mutex<State>>);

impl Sink for Feed {
    fn record(&mut self, r: &Record) -> io::Result<()> {
        let mut st = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Record::Status(s) = r {
            st.probe = s.probe.to_string();
        }
        st.analyzer.add(r);
        if let Record::Drop(d) | Record::Conntrack(d) = r {
            // Benign frees and local noise are no part of a VIP's view.
            if !d.is_loss() {
                return Ok(());
            }
        }
        if let (Some(vip), Some(text)) = (r.vip(), describe(r)) {
            let q = st.recent.entry(vip.to_string()).or_default();
            q.push_back(text);
            if q.len() > RECENT {
                q.pop_front();
            }
        }
        Ok(())
    }
}

/// The detail pane's line of a record.
fn describe(r: &Record) -> Option<String> {
    let time = r.time().unwrap_or_default().to_string();
    let time = time.get(11..23).unwrap_or(&time).to_owned();
    let port = |p: Option<u16>| p.map_or("null".to_owned(), |p| p.to_string());
    let ip = |a: Option<std::net::IpAddr>| a.map_or("-".to_owned(), |a| a.to_string());
    Some(match r {
        Record::Drop(d) | Record::Conntrack(d) => format!(
            "{time} {} {} {}:{} -> {}:{} netns {}",
            d.event.map_or(d.reason.to_string(), |e| e.to_string()),
            d.proto.map_or("-".to_owned(), |p| p.to_string()),
            ip(d.src),
            port(d.sport),
            ip(d.dst),
            port(d.dport),
            d.netns
        ),
        Record::Arp(a) => format!(
            "{time} {}{} {} {} is-at {}",
            if a.gratuitous { "GARP " } else { "" },
            a.direction,
            a.op,
            ip(a.sender_ip),
            a.sender_mac
        ),
        Record::VipOwner(o) => format!(
            "{time} OWNER {} -> {}",
            o.old_mac.map_or("none".to_owned(), |m| m.to_string()),
            o.new_mac
        ),
        Record::Neigh(n) => format!(
            "{time} NEIGH {} {} -> {} {}",
            n.old_mac, n.old_state, n.new_mac, n.new_state
        ),
        Record::Finding(f) => format!("{time} {} {}", f.finding.as_str(), f.detail),
        _ => return None,
    })
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

impl View {
    /// Acts on a key; true when it quits. `rows_now` gives what pausing freezes.
    fn key(&mut self, key: KeyEvent, rows_now: impl FnOnce() -> Vec<[String; 7]>) -> bool {
        if self.editing_filter {
            match key.code {
                KeyCode::Enter | KeyCode::Esc => self.editing_filter = false,
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return false;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return true,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return true,
            KeyCode::Down | KeyCode::Char('j') => self.selected += 1,
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Char('p') => {
                self.paused = match self.paused.take() {
                    Some(_) => None,
                    None => Some(rows_now()),
                };
            }
            _ => {}
        }
        false
    }
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
            let owner = st
                .analyzer
                .owner(&vip)
                .map_or_else(|| "-".into(), |m| m.to_string());
            let last_move = changes.last().map_or("-".to_owned(), |(t, _, _)| {
                format!("{}s ago", now.saturating_sub(*t as u64))
            });
            let finding = diagnosis
                .iter()
                .find(|d| d.vip == vip)
                .and_then(|d| d.findings.first())
                .map_or("-".to_owned(), |f| {
                    format!("{} {}", f.cause.as_str(), number(f.confidence))
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

/// The top line: what is traced, paused, the filter being typed.
fn title(st: &State, view: &View) -> String {
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
    let probe = if st.probe.is_empty() {
        "starting".to_owned()
    } else {
        format!("tracing with {}", st.probe)
    };
    format!("lbtrace top — {probe}{status}{filter}")
}

fn draw(f: &mut Frame<'_>, st: &State, view: &mut View, rows_now: &[[String; 7]]) {
    let [head, table_area, detail, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(RECENT as u16 + 2),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(Line::from(title(st, view))).bold(), head);
    // The VIP with its Services (kube-proxy's rules), which the filter matches too.
    let visible: Vec<(String, &[String; 7])> = rows_now
        .iter()
        .map(|r| (st.analyzer.title(&r[0]), r))
        .filter(|(t, _)| view.filter.is_empty() || t.contains(&view.filter))
        .collect();
    let vip_width = visible
        .iter()
        .map(|(t, _)| t.len())
        .max()
        .unwrap_or(0)
        .clamp(18, 48);
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
        visible
            .iter()
            .map(|(t, r)| Row::new(std::iter::once(t.clone()).chain(r[1..].iter().cloned()))),
        [
            Constraint::Length(vip_width as u16),
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
    let selected = visible.get(view.selected).map(|(_, r)| r[0].clone());
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
    super::common::require_privileges()?;
    let mut feed = Feed(state.clone());
    let stop = Stop::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let r = trace(&args, vec![&mut feed], true, &stop);
            let _ = done_tx.send(());
            r
        })
    };
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
        if view.key(key, || {
            rows(&state.lock().unwrap_or_else(PoisonError::into_inner), now)
        }) {
            break;
        }
    }
    drop(terminal);
    drop(restore);
    if !finished {
        // The pipeline ends as on Ctrl-C: detach, drain, summarize.
        stop.stop();
    }
    let (summary, _) = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the tracing thread panicked"))??;
    summary.write_text(&mut io::stderr())?;
    Ok(())
}
