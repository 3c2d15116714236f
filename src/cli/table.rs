//! Aligned plain-text tables for people; `--json` is for scripts.

/// A table: a header row and rows of cells, numbers right-aligned.
pub struct Table {
    head: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns are left-aligned unless listed in `right` (by index).
    pub fn new(head: &[&'static str], right: &[usize]) -> Self {
        Table {
            head: head.to_vec(),
            right: (0..head.len()).map(|i| right.contains(&i)).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.head.len());
        self.rows.push(cells);
    }

    /// The lines, without line ends; trailing spaces trimmed.
    pub fn lines(&self) -> Vec<String> {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.head.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, c) in cells.enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - width(c));
                if self.right[i] {
                    out.push_str(&pad);
                    out.push_str(c);
                } else {
                    out.push_str(c);
                    out.push_str(&pad);
                }
            }
            out.trim_end().to_string()
        };
        let mut out = vec![line(&mut self.head.iter().copied())];
        out.extend(
            self.rows
                .iter()
                .map(|r| line(&mut r.iter().map(String::as_str))),
        );
        out
    }

    /// The table as text, one line each, ending with a newline.
    pub fn render(&self) -> String {
        let mut s = self.lines().join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&["KIND", "NAME", "BURST"], &[2]);
        t.row(vec!["key".into(), "acme".into(), "10".into()]);
        t.row(vec!["default".into(), "-".into(), "1".into()]);
        assert_eq!(
            t.render(),
            "KIND     NAME  BURST\nkey      acme     10\ndefault  -         1\n"
        );
    }
}
