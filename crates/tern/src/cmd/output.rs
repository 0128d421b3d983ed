//! Output formats: aligned human tables, key/value sheets, or the API's JSON objects.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::CliError;

/// `-o table|json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The API's objects, pretty-printed.
    Json,
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::failed(format!("cannot encode JSON: {e}")))?;
    println!("{s}");
    Ok(())
}

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table; the last column is not padded (no trailing spaces).
    pub fn render(&self) -> String {
        let ncols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(ncols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = r.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == ncols {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// A key/value sheet for `show` commands.
#[derive(Debug, Default)]
pub struct Sheet {
    rows: Vec<(String, String)>,
}

impl Sheet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, key: &str, value: impl ToString) -> &mut Self {
        self.rows.push((key.to_string(), value.to_string()));
        self
    }

    pub fn render(&self) -> String {
        let w = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        let mut out = String::new();
        for (k, v) in &self.rows {
            let key = format!("{k}:");
            let _ = writeln!(out, "{key:<w$} {v}");
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `-` for absent values.
pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Local wall-clock time, second precision.
pub fn time(t: &DateTime<Utc>) -> String {
    t.with_timezone(&chrono::Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// How long ago, e.g. `3s ago`, `5m ago`.
pub fn ago(t: &DateTime<Utc>) -> String {
    let s = (Utc::now() - *t).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

/// First 8 characters of a UUID, as tables show it.
pub fn short_id(id: &uuid::Uuid) -> String {
    id.to_string()[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["NAME", "STATE"]);
        t.row(vec!["a-long-name".into(), "running".into()]);
        t.row(vec!["b".into(), "stopped".into()]);
        assert_eq!(
            t.render(),
            "NAME         STATE\na-long-name  running\nb            stopped\n"
        );
    }

    #[test]
    fn sheet_aligns_keys() {
        let mut s = Sheet::new();
        s.add("name", "web").add("memory_mib", 256);
        assert_eq!(s.render(), "name:       web\nmemory_mib: 256\n");
    }
}
