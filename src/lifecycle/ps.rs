//! `katalite ps` output: Docker's columns (CONTAINER ID, IMAGE, COMMAND, CREATED, STATUS,
//! PORTS, NAMES) laid out like its tabwriter (cells padded by 3, at least 10 wide).

use super::state::{State, Status, SHORT_ID_LEN};
use super::time::human_duration;

const HEADER: [&str; 7] = [
    "CONTAINER ID",
    "IMAGE",
    "COMMAND",
    "CREATED",
    "STATUS",
    "PORTS",
    "NAMES",
];
/// Docker's tabwriter settings: minimum cell width and padding.
const MIN_WIDTH: usize = 10;
const PADDING: usize = 3;
/// Docker truncates the command to this many characters (`…` included).
const COMMAND_WIDTH: usize = 20;

/// The table for `states` (already filtered and ordered).
pub fn table(states: &[&State]) -> String {
    let rows: Vec<[String; 7]> = std::iter::once(HEADER.map(String::from))
        .chain(states.iter().map(|s| row(s)))
        .collect();
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max((cell.chars().count() + PADDING).max(MIN_WIDTH));
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn row(state: &State) -> [String; 7] {
    [
        state.id.chars().take(SHORT_ID_LEN).collect(),
        state.image.clone(),
        command(&state.command),
        format!("{} ago", human_duration(state.created.elapsed())),
        status(state),
        state.ports.join(", "),
        state.name.clone(),
    ]
}

/// The command, cut to [`COMMAND_WIDTH`] characters with `…`, in double quotes.
fn command(argv: &[String]) -> String {
    let full = argv.join(" ");
    let text = if full.chars().count() > COMMAND_WIDTH {
        let mut cut: String = full.chars().take(COMMAND_WIDTH - 1).collect();
        cut.push('…');
        cut
    } else {
        full
    };
    format!("{text:?}")
}

/// "Up 3 seconds", "Exited (0) 2 seconds ago", "Created"; a container whose supervisor
/// died is "Exited (137) (unknown)": its real end was never recorded.
pub fn status(state: &State) -> String {
    match state.status {
        Status::Created => "Created".into(),
        Status::Running => {
            let up = state.started.unwrap_or(state.created).elapsed();
            format!("Up {}", human_duration(up))
        }
        Status::Exited => {
            let code = state.exit_code.unwrap_or_default();
            match (state.lost, state.finished) {
                (false, Some(at)) => {
                    format!("Exited ({code}) {} ago", human_duration(at.elapsed()))
                }
                _ => format!("Exited ({code}) (unknown)"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::time::Timestamp;
    use std::path::PathBuf;

    fn state(name: &str, status: Status) -> State {
        State {
            id: "0123456789abcdef".repeat(4),
            name: name.into(),
            image: "busybox".into(),
            command: vec!["sh".into(), "-c".into(), "echo up; sleep 1000".into()],
            created: Timestamp::now(),
            status,
            exit_code: None,
            started: Some(Timestamp::now()),
            finished: None,
            supervisor: None,
            ports: Vec::new(),
            log_path: PathBuf::new(),
            auto_remove: false,
            mounts: Vec::new(),
            lost: false,
        }
    }

    #[test]
    fn commands_are_cut_and_quoted_like_dockers() {
        let argv = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(command(&argv(&["true"])), "\"true\"");
        assert_eq!(
            command(&argv(&["sh", "-c", "echo up; sleep 1000"])),
            "\"sh -c echo up; slee…\""
        );
        assert_eq!(command(&argv(&["say", "\"hi\""])), r#""say \"hi\"""#);
        assert_eq!(command(&[]), "\"\"");
    }

    #[test]
    fn statuses_read_like_dockers() {
        let running = state("web", Status::Running);
        assert_eq!(status(&running), "Up Less than a second");
        let mut exited = state("web", Status::Exited);
        exited.exit_code = Some(143);
        exited.finished = Some(Timestamp::now());
        assert_eq!(status(&exited), "Exited (143) Less than a second ago");
        exited.lost = true;
        exited.exit_code = Some(137);
        assert_eq!(status(&exited), "Exited (137) (unknown)");
        assert_eq!(status(&state("", Status::Created)), "Created");
    }

    #[test]
    fn the_table_aligns_dockers_columns() {
        let mut web = state("web", Status::Running);
        web.ports = vec!["127.0.0.1:8080->80/tcp".into()];
        let other = state("", Status::Created);
        let text = table(&[&web, &other]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("CONTAINER ID   IMAGE     COMMAND "),
            "{text}"
        );
        assert!(
            lines[1].starts_with("0123456789ab   busybox   \"sh -c "),
            "{text}"
        );
        assert!(lines[1].ends_with("127.0.0.1:8080->80/tcp   web"), "{text}");
        let status_col = lines[0].find("STATUS").expect("STATUS");
        let from = |line: &str| line.chars().skip(status_col).collect::<String>();
        assert!(
            from(lines[1]).starts_with("Up Less than a second   "),
            "{text}"
        );
        assert_eq!(from(lines[2]), "Created", "{text}");
        // Docker's own empty listing, byte for byte.
        assert_eq!(
            table(&[]),
            "CONTAINER ID   IMAGE     COMMAND   CREATED   STATUS    PORTS     NAMES\n"
        );
    }
}
