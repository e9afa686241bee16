//! Reads a TOML document into a checked [`Config`](super::Config).
//!
//! The document is parsed into toml's spanned tree (`DeTable`), then walked with
//! [`TableReader`]: each reader knows its key path, hands out typed values as
//! [`Field`]s, and remembers which keys were asked for, so that whatever is left
//! at the end is reported as an unknown key. Every problem is collected (never
//! only the first) with the byte offset of the value at fault, then turned into
//! `FILE:LINE:COL: key.path: message` lines sorted by position.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Config, ConfigError, ConfigErrors, sections, units, validate};

pub(super) fn read(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(err) => return Err(ConfigErrors::single(syntax_error(&file, text, &err))),
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let context = Context::new(dir);
    let reader = TableReader::new(&context, String::new(), root.get_ref(), root.span().start);
    let (mut config, locations) = sections::config(reader);
    config.path = path.to_path_buf();
    validate::check(&config, &locations, &context);
    context.finish(config, text, &file)
}

/// A TOML syntax error as one located problem.
fn syntax_error(file: &str, text: &str, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    let mut message = err.message().trim().to_string();
    if let Some(span) = &span {
        // toml says only "duplicate key"; name it.
        if message == "duplicate key" {
            if let Some(key) = text.get(span.clone()) {
                message = format!("duplicate key {key:?}");
            }
        }
    }
    ConfigError {
        file: file.to_string(),
        position: span.map(|span| line_col(text, span.start)),
        key: String::new(),
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely
/// typo (a few edits, case ignored).
pub(super) fn closest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            (
                edit_distance(&word, &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        .filter(|&(distance, candidate)| {
            distance < candidate.chars().count()
                && distance <= (candidate.chars().count() / 3).max(1)
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Optimal string alignment distance: Levenshtein plus adjacent transpositions,
/// so "kye" is one edit from "key".
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for j in 0..=b.len() {
        rows[0][j] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// `servers` -> `servers`, `X Tenant` -> `"X Tenant"`: key path segments are
/// quoted when TOML would need quotes.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key_segment(key)
    } else {
        format!("{parent}.{}", key_segment(key))
    }
}

/// A place in the file: byte offset and key path. Kept beside the model for the
/// cross-checks, which report at the value they are about.
#[derive(Debug, Clone)]
pub(super) struct Loc {
    pub at: usize,
    pub key: String,
}

struct Problem {
    at: usize,
    key: String,
    message: String,
}

/// What every reader shares: the config file's directory (for relative paths)
/// and the problems found so far.
pub(super) struct Context {
    dir: PathBuf,
    problems: RefCell<Vec<Problem>>,
}

impl Context {
    pub(super) fn new(dir: &Path) -> Self {
        Context {
            dir: dir.to_path_buf(),
            problems: RefCell::new(Vec::new()),
        }
    }

    pub(super) fn report(&self, loc: &Loc, message: impl Into<String>) {
        self.problems.borrow_mut().push(Problem {
            at: loc.at,
            key: loc.key.clone(),
            message: message.into(),
        });
    }

    /// `config` if nothing was reported, else every problem in file order.
    fn finish(self, config: Config, text: &str, file: &str) -> Result<Config, ConfigErrors> {
        let mut problems = self.problems.into_inner();
        if problems.is_empty() {
            return Ok(config);
        }
        problems.sort_by_key(|problem| problem.at);
        Err(ConfigErrors(
            problems
                .into_iter()
                .map(|problem| ConfigError {
                    file: file.to_string(),
                    position: Some(line_col(text, problem.at)),
                    key: problem.key,
                    message: problem.message,
                })
                .collect(),
        ))
    }
}

/// A table being read: its key path, position, and the keys asked for so far.
/// Call [`TableReader::finish`] when done so leftover keys are reported.
pub(super) struct TableReader<'a> {
    context: &'a Context,
    path: String,
    at: usize,
    table: &'a DeTable<'a>,
    known: Vec<&'static str>,
}

impl<'a> TableReader<'a> {
    pub(super) fn new(
        context: &'a Context,
        path: String,
        table: &'a DeTable<'a>,
        at: usize,
    ) -> Self {
        TableReader {
            context,
            path,
            at,
            table,
            known: Vec::new(),
        }
    }

    pub(super) fn context(&self) -> &'a Context {
        self.context
    }

    /// Where a key of this table would be, for problems about a key left out.
    pub(super) fn loc_of(&self, key: &str) -> Loc {
        Loc {
            at: self.at,
            key: join_path(&self.path, key),
        }
    }

    /// The value of `key`, if present; marks the key as known.
    pub(super) fn get(&mut self, key: &'static str) -> Option<Field<'a>> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        let value = self.table.get(key)?;
        Some(Field {
            context: self.context,
            path: join_path(&self.path, key),
            value,
        })
    }

    /// Like `get`, but a missing key is a problem, reported at the table.
    pub(super) fn require(&mut self, key: &'static str) -> Option<Field<'a>> {
        let field = self.get(key);
        if field.is_none() {
            self.context
                .report(&self.loc_of(key), "missing required key");
        }
        field
    }

    /// Reports every key that no getter asked for.
    pub(super) fn finish(self) {
        for (key, _) in self.table.iter() {
            let name: &str = key.get_ref();
            if self.known.contains(&name) {
                continue;
            }
            let mut message = format!("unknown key {name:?}");
            if let Some(suggestion) = closest(name, self.known.iter().copied()) {
                message.push_str(&format!(" (did you mean {suggestion:?}?)"));
            }
            let loc = Loc {
                at: key.span().start,
                key: self.path.clone(),
            };
            self.context.report(&loc, message);
        }
    }

    // Shorthands for the common `get(key)` + conversion.

    pub(super) fn bool(&mut self, key: &'static str) -> Option<bool> {
        self.get(key)?.bool()
    }

    pub(super) fn duration(&mut self, key: &'static str) -> Option<Duration> {
        self.get(key)?.duration()
    }

    /// A duration that must not be zero (intervals, timeouts that would fire at once).
    pub(super) fn positive_duration(&mut self, key: &'static str) -> Option<Duration> {
        self.get(key)?.positive_duration()
    }

    pub(super) fn int_in<T: TryFrom<i64>>(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<T> {
        self.get(key)?.int_in(range)
    }

    pub(super) fn int_at_least<T: TryFrom<i64>>(
        &mut self,
        key: &'static str,
        min: i64,
    ) -> Option<T> {
        self.get(key)?.int_at_least(min)
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        options: &[(&str, T)],
    ) -> Option<T> {
        self.get(key)?.choice(options)
    }

    pub(super) fn path(&mut self, key: &'static str) -> Option<PathBuf> {
        self.get(key)?.path()
    }

    pub(super) fn string_array(&mut self, key: &'static str) -> Option<Vec<(String, Field<'a>)>> {
        self.get(key)?.string_array()
    }

    pub(super) fn table(&mut self, key: &'static str) -> Option<TableReader<'a>> {
        self.get(key)?.table()
    }

    /// An array of tables (`[[key]]` or `key = [{..}, {..}]`); entries that are
    /// not tables are reported and skipped.
    pub(super) fn tables(&mut self, key: &'static str) -> Vec<TableReader<'a>> {
        self.get(key)
            .map(|field| field.tables())
            .unwrap_or_default()
    }

    /// A table of tables keyed by name (`[frontends.NAME]`), in file order.
    pub(super) fn named_tables(&mut self, key: &'static str) -> Vec<(Named, TableReader<'a>)> {
        self.get(key)
            .map(|field| field.named_tables())
            .unwrap_or_default()
    }
}

/// A key of a free-form table (a frontend's name, a header name), with where it
/// is written.
#[derive(Debug, Clone)]
pub(super) struct Named {
    pub name: String,
    pub loc: Loc,
}

/// One value, with its key path; conversions report their own problems and
/// return `None` on failure.
#[derive(Clone)]
pub(super) struct Field<'a> {
    context: &'a Context,
    path: String,
    value: &'a Spanned<DeValue<'a>>,
}

impl<'a> Field<'a> {
    pub(super) fn loc(&self) -> Loc {
        Loc {
            at: self.value.span().start,
            key: self.path.clone(),
        }
    }

    pub(super) fn error(&self, message: impl Into<String>) {
        self.context.report(&self.loc(), message);
    }

    /// The value's type, with scalars shown: `integer 2`, `float 1.2`, `table`.
    fn found(&self) -> String {
        match self.value.get_ref() {
            DeValue::Integer(int) => format!("integer {int}"),
            DeValue::Float(float) => format!("float {float}"),
            DeValue::Boolean(b) => format!("boolean {b}"),
            DeValue::Datetime(dt) => format!("datetime {dt}"),
            other => other.type_str().to_string(),
        }
    }

    fn type_error(&self, expected: &str) {
        self.error(format!("expected {expected}, found {}", self.found()));
    }

    pub(super) fn str(&self) -> Option<&'a str> {
        match self.value.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.type_error("a string");
                None
            }
        }
    }

    pub(super) fn string(&self) -> Option<String> {
        self.str().map(str::to_string)
    }

    /// A string that must not be empty.
    pub(super) fn non_empty(&self) -> Option<&'a str> {
        let text = self.str()?;
        if text.is_empty() {
            self.error("must not be empty");
            return None;
        }
        Some(text)
    }

    pub(super) fn bool(&self) -> Option<bool> {
        match self.value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.type_error("true or false");
                None
            }
        }
    }

    pub(super) fn integer(&self) -> Option<i64> {
        match self.value.get_ref() {
            DeValue::Integer(int) => match i64::from_str_radix(int.as_str(), int.radix()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error(format!("integer {int} is too large"));
                    None
                }
            },
            _ => {
                self.type_error("an integer");
                None
            }
        }
    }

    pub(super) fn int_in<T: TryFrom<i64>>(
        &self,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<T> {
        let n = self.integer()?;
        if !range.contains(&n) {
            self.error(format!(
                "must be between {} and {}, got {n}",
                range.start(),
                range.end()
            ));
            return None;
        }
        self.convert(n)
    }

    pub(super) fn int_at_least<T: TryFrom<i64>>(&self, min: i64) -> Option<T> {
        let n = self.integer()?;
        if n < min {
            self.error(format!("must be at least {min}, got {n}"));
            return None;
        }
        self.convert(n)
    }

    fn convert<T: TryFrom<i64>>(&self, n: i64) -> Option<T> {
        match T::try_from(n) {
            Ok(value) => Some(value),
            Err(_) => {
                self.error(format!("{n} is too large"));
                None
            }
        }
    }

    pub(super) fn is_integer(&self) -> bool {
        self.value.get_ref().is_integer()
    }

    /// The value of a check made on this field; its error is the whole message.
    pub(super) fn ok<T>(&self, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.error(message);
                None
            }
        }
    }

    /// Parses a string with `parse`, whose error is the whole message.
    pub(super) fn parse<T>(&self, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let text = self.str()?;
        self.ok(parse(text))
    }

    /// Durations are strings (`"2s"`); a bare number is refused because its unit
    /// would be a guess.
    pub(super) fn duration(&self) -> Option<Duration> {
        match self.value.get_ref() {
            DeValue::String(_) => self.parse(units::parse_duration),
            _ => {
                self.type_error("a duration string like \"2s\"");
                None
            }
        }
    }

    pub(super) fn positive_duration(&self) -> Option<Duration> {
        let duration = self.duration()?;
        if duration.is_zero() {
            self.error("must be greater than 0s");
            return None;
        }
        Some(duration)
    }

    /// A size: an integer number of bytes or a string with a unit (`"64KiB"`).
    pub(super) fn size(&self) -> Option<u64> {
        match self.value.get_ref() {
            DeValue::String(_) => self.parse(units::parse_size),
            DeValue::Integer(_) => self.int_at_least(0),
            _ => {
                self.type_error("a size in bytes or a string like \"64KiB\"");
                None
            }
        }
    }

    /// One of a fixed set of strings.
    pub(super) fn choice<T: Copy>(&self, options: &[(&str, T)]) -> Option<T> {
        let names: Vec<String> = options
            .iter()
            .map(|(name, _)| format!("{name:?}"))
            .collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        let DeValue::String(text) = self.value.get_ref() else {
            self.type_error(&expected);
            return None;
        };
        match options.iter().find(|(name, _)| name == text) {
            Some(&(_, value)) => Some(value),
            None => {
                self.error(format!("invalid value {text:?} (expected {expected})"));
                None
            }
        }
    }

    /// A file path; relative paths are taken from the config file's directory.
    pub(super) fn path(&self) -> Option<PathBuf> {
        let text = self.non_empty()?;
        let path = Path::new(text);
        Some(if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.context.dir.join(path)
        })
    }

    pub(super) fn socket_addr(&self) -> Option<SocketAddr> {
        self.parse(|text| {
            text.parse()
                .map_err(|_| format!("invalid socket address {text:?}"))
        })
    }

    /// The items of an array, each with its indexed key path.
    pub(super) fn array(&self) -> Option<Vec<Field<'a>>> {
        match self.value.get_ref() {
            DeValue::Array(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, value)| Field {
                        context: self.context,
                        path: format!("{}[{i}]", self.path),
                        value,
                    })
                    .collect(),
            ),
            _ => {
                self.type_error("an array");
                None
            }
        }
    }

    /// An array of strings; non-string items are reported and skipped.
    pub(super) fn string_array(&self) -> Option<Vec<(String, Field<'a>)>> {
        Some(
            self.array()?
                .into_iter()
                .filter_map(|item| Some((item.string()?, item)))
                .collect(),
        )
    }

    /// One string or an array of them (`bind = "a"` or `bind = ["a", "b"]`).
    pub(super) fn one_or_many(&self) -> Option<Vec<Field<'a>>> {
        match self.value.get_ref() {
            DeValue::String(_) => Some(vec![self.clone()]),
            DeValue::Array(_) => self.array(),
            _ => {
                self.type_error("a string or an array of strings");
                None
            }
        }
    }

    pub(super) fn table(&self) -> Option<TableReader<'a>> {
        match self.value.get_ref() {
            DeValue::Table(table) => Some(TableReader::new(
                self.context,
                self.path.clone(),
                table,
                self.value.span().start,
            )),
            _ => {
                self.type_error("a table");
                None
            }
        }
    }

    pub(super) fn tables(&self) -> Vec<TableReader<'a>> {
        self.array()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|item| item.table())
            .collect()
    }

    /// The entries of a free-form table (names chosen by the user).
    pub(super) fn entries(&self) -> Option<Vec<(Named, Field<'a>)>> {
        let DeValue::Table(table) = self.value.get_ref() else {
            self.type_error("a table");
            return None;
        };
        Some(
            table
                .iter()
                .map(|(key, value)| {
                    let path = join_path(&self.path, key.get_ref());
                    let named = Named {
                        name: key.get_ref().to_string(),
                        loc: Loc {
                            at: key.span().start,
                            key: path.clone(),
                        },
                    };
                    let field = Field {
                        context: self.context,
                        path,
                        value,
                    };
                    (named, field)
                })
                .collect(),
        )
    }

    /// A table of tables keyed by name (`[frontends.NAME]`), in file order;
    /// entries that are not tables are reported and skipped.
    pub(super) fn named_tables(&self) -> Vec<(Named, TableReader<'a>)> {
        self.entries()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, field)| Some((name, field.table()?)))
            .collect()
    }

    /// The number of items if this is an array (for "at least one" checks that
    /// must not repeat a problem already reported about an item).
    pub(super) fn array_len(&self) -> Option<usize> {
        match self.value.get_ref() {
            DeValue::Array(items) => Some(items.len()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // Columns count characters, not bytes: `=` after "bé " is column 4.
        let second_eq = text.rfind('=').unwrap_or_default();
        assert_eq!(second_eq, 10);
        assert_eq!(line_col(text, second_eq), (2, 4));
        assert_eq!(line_col(text, text.len() + 10), (3, 1));
    }

    #[test]
    fn suggestions() {
        let keys = ["threads", "max_connections", "key", "address"];
        assert_eq!(closest("kye", keys), Some("key"));
        assert_eq!(closest("thread", keys), Some("threads"));
        assert_eq!(closest("Threads", keys), Some("threads"));
        assert_eq!(closest("adress", keys), Some("address"));
        assert_eq!(closest("max_conections", keys), Some("max_connections"));
        assert_eq!(closest("zzz", keys), None);
        assert_eq!(closest("x", ["y"]), None);
    }

    #[test]
    fn key_paths_quote_when_needed() {
        assert_eq!(join_path("", "global"), "global");
        assert_eq!(join_path("frontends", "public"), "frontends.public");
        assert_eq!(join_path("headers", "X Tenant"), "headers.\"X Tenant\"");
        assert_eq!(join_path("frontends", "a.b"), "frontends.\"a.b\"");
    }
}
