//! Shopper behaviour in the RecBole atomic-file format, the leave-one-out splits rebuilt
//! from it, and the deterministic split of users into merchants.
//!
//! A dataset folder holds `NAME.item` (`item_id:token  title:token_seq`),
//! `NAME.test.inter` and `NAME.valid.inter` (`user_id:token  item_id_list:token_seq
//! item_id:token`). For a user with history h1..hn and test target t: the test example is
//! (h1..hn → t), the validation example (h1..h(n−1) → hn), and training uses the prefixes
//! (h1..h(k−1) → hk) for 2 ≤ k ≤ n−1. No training example ever has a validation or test
//! target as its label. Exports whose `item_id_list` RecBole truncated to a maximum length
//! are accepted: the two files' windows must agree where they overlap, and the longer one
//! is the history.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

/// A malformed or inconsistent data file, named with the line at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: no *.item file (expected NAME.item, NAME.test.inter, NAME.valid.inter)")]
    MissingFiles(PathBuf),
    #[error("{path}:1: header is {found:?}, expected {expected:?}")]
    Header { path: PathBuf, expected: String, found: String },
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

/// An item's index in the catalogue (0-based, dense).
pub type ItemIndex = u32;

/// One user's chronological history (h1..hn) and the item bought next (the test target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub history: Vec<ItemIndex>,
    pub test_target: ItemIndex,
}

/// A next-item example: the history so far (oldest first) and the item that followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Example<'a> {
    pub history: &'a [ItemIndex],
    pub target: ItemIndex,
}

impl User {
    /// (h1..h(k−1) → hk) for 2 ≤ k ≤ n−1.
    pub fn training_examples(&self) -> impl Iterator<Item = Example<'_>> {
        let n = self.history.len();
        (1..n.saturating_sub(1))
            .map(move |k| Example { history: &self.history[..k], target: self.history[k] })
    }

    /// (h1..h(n−1) → hn), if the history has at least two items.
    pub fn validation_example(&self) -> Option<Example<'_>> {
        let n = self.history.len();
        (n >= 2).then(|| Example { history: &self.history[..n - 1], target: self.history[n - 1] })
    }

    /// (h1..hn → t).
    pub fn test_example(&self) -> Example<'_> {
        Example { history: &self.history, target: self.test_target }
    }
}

#[derive(Debug)]
pub struct Dataset {
    pub name: String,
    /// Product titles, by item index.
    pub titles: Vec<String>,
    /// Each item's id in the dataset's files, by item index (what a shop calls it).
    pub item_ids: Vec<u64>,
    pub users: Vec<User>,
}

const ITEM_HEADER: &str = "item_id:token\ttitle:token_seq";
const INTER_HEADER: &str = "user_id:token\titem_id_list:token_seq\titem_id:token";

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_owned(), source })
}

fn lines_after_header<'a>(
    path: &Path,
    text: &'a str,
    expected: &str,
) -> Result<impl Iterator<Item = (usize, &'a str)>, DataError> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let header = lines.next().map_or("", |(_, l)| l);
    if header != expected {
        return Err(DataError::Header {
            path: path.to_owned(),
            expected: expected.into(),
            found: header.into(),
        });
    }
    Ok(lines.filter(|(_, l)| !l.is_empty()))
}

fn line_error(path: &Path, line: usize, reason: impl Into<String>) -> DataError {
    DataError::Line { path: path.to_owned(), line, reason: reason.into() }
}

fn numeric_id(path: &Path, line: usize, field: &str, token: &str) -> Result<u64, DataError> {
    token
        .parse::<u64>()
        .map_err(|_| line_error(path, line, format!("{field} {token:?} is not a non-negative integer")))
}

/// Interactions of one `.inter` file: (user id, history, target), with line numbers.
type Rows = Vec<(usize, String, Vec<ItemIndex>, ItemIndex)>;

fn read_inter(path: &Path, items: &HashMap<u64, ItemIndex>) -> Result<Rows, DataError> {
    let text = read(path)?;
    let mut rows = Vec::new();
    for (line, l) in lines_after_header(path, &text, INTER_HEADER)? {
        let fields: Vec<&str> = l.split('\t').collect();
        let [user, list, target] = fields[..] else {
            return Err(line_error(path, line, format!("{} tab-separated fields, expected 3", fields.len())));
        };
        numeric_id(path, line, "user id", user)?;
        let item = |token: &str| -> Result<ItemIndex, DataError> {
            let id = numeric_id(path, line, "item id", token)?;
            items.get(&id).copied().ok_or_else(|| line_error(path, line, format!("unknown item id {id}")))
        };
        let history = list.split(' ').filter(|t| !t.is_empty()).map(item).collect::<Result<Vec<_>, _>>()?;
        if history.is_empty() {
            return Err(line_error(path, line, format!("user {user} has an empty history")));
        }
        rows.push((line, user.to_owned(), history, item(target)?));
    }
    Ok(rows)
}

/// A user's longest history from the two windows RecBole wrote of one sequence
/// s1..sN: the test row's history ends at s(N−1) (its target is sN), the validation row's
/// history plus its target ends there too. Without truncation the validation window is the
/// test history minus its last item; RecBole truncates `item_id_list` to a maximum length
/// (50 by default), so for a long sequence the validation window starts one item earlier.
/// Either way one window must be a suffix of the other (they agree where they overlap);
/// the longer one is the history. `None` if they disagree.
fn reconcile(
    test_history: Vec<ItemIndex>,
    valid_history: &[ItemIndex],
    valid_target: ItemIndex,
) -> Option<Vec<ItemIndex>> {
    let mut valid_window = Vec::with_capacity(valid_history.len() + 1);
    valid_window.extend_from_slice(valid_history);
    valid_window.push(valid_target);
    if test_history.len() < 2 {
        return None;
    }
    if test_history.ends_with(&valid_window) {
        Some(test_history)
    } else if valid_window.ends_with(&test_history) {
        Some(valid_window)
    } else {
        None
    }
}

impl Dataset {
    /// Loads the dataset in `dir` (the single `NAME.item` there names it).
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let entries =
            std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.to_owned(), source })?;
        let name = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find_map(|f| f.strip_suffix(".item").map(str::to_owned))
            .ok_or_else(|| DataError::MissingFiles(dir.to_owned()))?;

        let item_path = dir.join(format!("{name}.item"));
        let text = read(&item_path)?;
        let mut items = HashMap::new();
        let mut titles = Vec::new();
        let mut item_ids = Vec::new();
        for (line, l) in lines_after_header(&item_path, &text, ITEM_HEADER)? {
            let (id, title) =
                l.split_once('\t').ok_or_else(|| line_error(&item_path, line, "expected `id<TAB>title`"))?;
            let id = numeric_id(&item_path, line, "item id", id)?;
            if items.insert(id, titles.len() as ItemIndex).is_some() {
                return Err(line_error(&item_path, line, format!("item id {id} appears twice")));
            }
            titles.push(title.trim().to_owned());
            item_ids.push(id);
        }

        let test_path = dir.join(format!("{name}.test.inter"));
        let valid_path = dir.join(format!("{name}.valid.inter"));
        let test = read_inter(&test_path, &items)?;
        let valid: HashMap<String, (usize, Vec<ItemIndex>, ItemIndex)> =
            read_inter(&valid_path, &items)?.into_iter().map(|(line, u, h, t)| (u, (line, h, t))).collect();

        let mut users = Vec::with_capacity(test.len());
        for (line, id, history, test_target) in test {
            let history = match valid.get(&id) {
                None => history,
                Some((vline, vhistory, vtarget)) => {
                    reconcile(history, vhistory, *vtarget).ok_or_else(|| {
                        line_error(
                            &valid_path,
                            *vline,
                            format!(
                                "user {id} disagrees with {}:{line} (expected its history minus the last item, \
                                 or a window of the same sequence that ends where the test history ends)",
                                test_path.display()
                            ),
                        )
                    })?
                }
            };
            users.push(User { id, history, test_target });
        }
        Ok(Self { name, titles, item_ids, users })
    }

    pub fn title(&self, item: ItemIndex) -> &str {
        &self.titles[item as usize]
    }

    /// The dataset restricted to the first `n` users and the items they touch (re-indexed
    /// in first-seen order): a smaller catalogue for quick runs.
    pub fn first_users(&self, n: usize) -> Dataset {
        let mut remap: HashMap<ItemIndex, ItemIndex> = HashMap::new();
        let mut titles = Vec::new();
        let mut item_ids = Vec::new();
        let mut map = |item: ItemIndex| {
            *remap.entry(item).or_insert_with(|| {
                titles.push(self.titles[item as usize].clone());
                item_ids.push(self.item_ids[item as usize]);
                (titles.len() - 1) as ItemIndex
            })
        };
        let users = self.users[..n.min(self.users.len())]
            .iter()
            .map(|u| User {
                id: u.id.clone(),
                history: u.history.iter().map(|&i| map(i)).collect(),
                test_target: map(u.test_target),
            })
            .collect();
        Dataset { name: format!("{}-first{n}", self.name), titles, item_ids, users }
    }
}

/// Platform families, from the product titles: the natural non-IID split of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Family {
    Sony,
    Microsoft,
    Nintendo,
    Pc,
    Other,
}

impl Family {
    pub const ALL: [Family; 5] =
        [Family::Sony, Family::Microsoft, Family::Nintendo, Family::Pc, Family::Other];

    /// The platform family a title names, if any.
    pub fn of_title(title: &str) -> Option<Family> {
        let t = format!(" {} ", title.to_lowercase());
        let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
        if any(&["playstation", "ps4", "ps3", "ps2", " psp", "ps vita", "sony"]) {
            Some(Family::Sony)
        } else if any(&["xbox", "microsoft"]) {
            Some(Family::Microsoft)
        } else if any(&[
            "nintendo", "wii", "3ds", " ds ", "gamecube", "game boy", "gameboy", " switch", " nes", "snes",
            "amiibo",
        ]) {
            Some(Family::Nintendo)
        } else if any(&[" pc ", " pc/", "pc ", " mac ", "windows", "steam"]) {
            Some(Family::Pc)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Sony => "sony",
            Family::Microsoft => "microsoft",
            Family::Nintendo => "nintendo",
            Family::Pc => "pc",
            Family::Other => "other",
        }
    }
}

/// One merchant: a shop of users from one platform family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merchant {
    pub name: String,
    pub family: Family,
    /// Indices into `Dataset::users`.
    pub users: Vec<usize>,
}

/// Assigns every user to exactly one merchant: users go to the family most of their
/// history's titles name (ties in `Family::ALL` order; none named: `Other`), and each
/// family is cut into shops of about `shop_size` users, shuffled with `seed`.
pub fn partition(dataset: &Dataset, shop_size: usize, seed: u64) -> Vec<Merchant> {
    let item_family: Vec<Option<Family>> = dataset.titles.iter().map(|t| Family::of_title(t)).collect();
    let mut by_family: HashMap<Family, Vec<usize>> = HashMap::new();
    for (i, user) in dataset.users.iter().enumerate() {
        let mut counts = [0usize; 5];
        for &item in &user.history {
            if let Some(f) = item_family[item as usize] {
                counts[f as usize] += 1;
            }
        }
        let best = (0..4).max_by_key(|&f| (counts[f], std::cmp::Reverse(f))).filter(|&f| counts[f] > 0);
        by_family.entry(best.map_or(Family::Other, |f| Family::ALL[f])).or_default().push(i);
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut merchants = Vec::new();
    for family in Family::ALL {
        let Some(mut users) = by_family.remove(&family) else { continue };
        users.shuffle(&mut rng);
        let shops = users.len().div_ceil(shop_size.max(1)).max(1);
        let per_shop = users.len().div_ceil(shops);
        for (s, chunk) in users.chunks(per_shop.max(1)).enumerate() {
            let mut users = chunk.to_vec();
            users.sort_unstable();
            merchants.push(Merchant { name: format!("{}-{s:03}", family.name()), family, users });
        }
    }
    merchants
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    fn tiny(dir: &Path) {
        write(
            dir,
            "T.item",
            "item_id:token\ttitle:token_seq\n10\tHalo - Xbox One\n11\tZelda - Nintendo Switch\n12\tFIFA - PlayStation 4\n13\tCable\n",
        );
        write(dir, "T.test.inter", &format!("{INTER_HEADER}\n1\t10 11 12\t13\n2\t12 12\t10\n"));
        write(dir, "T.valid.inter", &format!("{INTER_HEADER}\n1\t10 11\t12\n2\t12\t12\n"));
    }

    #[test]
    fn first_users_keeps_their_items_and_titles() {
        let dir = tempfile::tempdir().expect("tempdir");
        tiny(dir.path());
        let full = Dataset::load(dir.path()).expect("valid");
        let sub = full.first_users(1);
        assert_eq!(sub.users.len(), 1);
        assert_eq!(sub.titles.len(), 4, "user 1 touches all four items");
        let title =
            |d: &Dataset, u: &User| u.history.iter().map(|&i| d.title(i).to_owned()).collect::<Vec<_>>();
        assert_eq!(title(&sub, &sub.users[0]), title(&full, &full.users[0]));
        assert_eq!(sub.title(sub.users[0].test_target), full.title(full.users[0].test_target));
        assert_eq!(full.first_users(2).titles.len(), full.titles.len());
    }

    fn check_error(mutate: impl FnOnce(&Path), expected: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        tiny(dir.path());
        mutate(dir.path());
        let error = Dataset::load(dir.path()).expect_err("must be refused").to_string();
        assert!(error.contains(expected), "{error:?} does not contain {expected:?}");
    }

    #[test]
    fn splits_are_rebuilt_without_leaking_targets() {
        let dir = tempfile::tempdir().expect("tempdir");
        tiny(dir.path());
        let data = Dataset::load(dir.path()).expect("valid");
        assert_eq!(data.name, "T");
        assert_eq!(data.titles.len(), 4);
        let u = &data.users[0];
        assert_eq!(u.history, vec![0, 1, 2]);
        let train: Vec<_> = u.training_examples().collect();
        assert_eq!(train, vec![Example { history: &[0], target: 1 }]);
        assert_eq!(u.validation_example(), Some(Example { history: &[0, 1], target: 2 }));
        assert_eq!(u.test_example(), Example { history: &[0, 1, 2], target: 3 });
        // No training label is the validation or test target position.
        assert!(train.iter().all(|e| e.history.len() < u.history.len() - 1));
    }

    #[test]
    fn corrupt_files_are_named_with_their_line() {
        // (file, its contents, what the error must say)
        let inter = |row: &str| format!("{INTER_HEADER}\n{row}\n");
        let cases = [
            ("T.item", "id\ttitle\n".to_owned(), "T.item:1: header is"),
            ("T.test.inter", inter("1\t10 99\t13"), "T.test.inter:2: unknown item id 99"),
            ("T.test.inter", inter("1\t10 x\t13"), "T.test.inter:2: item id \"x\" is not"),
            ("T.test.inter", inter("u\t10\t13"), "T.test.inter:2: user id \"u\""),
            ("T.test.inter", inter("1\t\t13"), "T.test.inter:2: user 1 has an empty history"),
            ("T.test.inter", inter("1\t10 11"), "T.test.inter:2: 2 tab-separated fields"),
            ("T.valid.inter", inter("1\t10 12\t12"), "T.valid.inter:2: user 1 disagrees"),
            (
                "T.item",
                "item_id:token\ttitle:token_seq\n10\tA\n10\tB\n".to_owned(),
                "T.item:3: item id 10 appears twice",
            ),
        ];
        for (file, contents, expected) in cases {
            check_error(|d| write(d, file, &contents), expected);
        }
        check_error(|d| std::fs::remove_file(d.join("T.item")).expect("rm"), "no *.item file");
    }

    /// A generated dataset written as RecBole writes it with `MAX_ITEM_LIST_LENGTH = max`:
    /// each row's `item_id_list` is the last `max` items before its target.
    fn truncated_export(dir: &Path, sequences: &[Vec<u64>], max: usize) {
        let items: String = (100..130).map(|i| format!("{i}\tItem {i} - PC\n")).collect();
        write(dir, "R.item", &format!("{ITEM_HEADER}\n{items}"));
        let row = |user: usize, seq: &[u64], end: usize| {
            let window = &seq[end.saturating_sub(max)..end];
            let list: Vec<String> = window.iter().map(u64::to_string).collect();
            format!("{user}\t{}\t{}\n", list.join(" "), seq[end])
        };
        let (mut test, mut valid) = (format!("{INTER_HEADER}\n"), format!("{INTER_HEADER}\n"));
        for (user, seq) in sequences.iter().enumerate() {
            test += &row(user, seq, seq.len() - 1);
            valid += &row(user, seq, seq.len() - 2);
        }
        write(dir, "R.test.inter", &test);
        write(dir, "R.valid.inter", &valid);
    }

    #[test]
    fn truncated_sliding_windows_are_accepted_and_the_longest_history_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Sequences of 3, 5, 6 and 9 items, truncated to 4: the first two fit, the last two
        // are cut, so their validation window starts one item before the test window.
        let sequences: Vec<Vec<u64>> = [3u64, 5, 6, 9]
            .iter()
            .enumerate()
            .map(|(u, &n)| (0..n).map(|k| 100 + (u as u64 * 7 + k) % 30).collect())
            .collect();
        truncated_export(dir.path(), &sequences, 4);
        let data = Dataset::load(dir.path()).expect("truncated windows that agree are accepted");
        let id = |item: u64| (item - 100) as ItemIndex;
        for (user, seq) in data.users.iter().zip(&sequences) {
            let n = seq.len();
            // The longest window: the validation row's (max + 1 items) when truncated.
            let expected: Vec<ItemIndex> =
                seq[(n - 1).saturating_sub(5)..n - 1].iter().map(|&i| id(i)).collect();
            assert_eq!(user.history, expected, "user {}", user.id);
            assert_eq!(user.test_target, id(seq[n - 1]));
            let v = user.validation_example().expect("validation");
            assert_eq!(v.target, id(seq[n - 2]), "the validation target is the item before the test target");
        }
        assert_eq!(data.users[3].history.len(), 5, "9 items truncated to 4 rebuild 5 of the history");

        // Windows that disagree where they overlap are still refused.
        let mut bad = sequences.clone();
        truncated_export(dir.path(), &bad, 4);
        let valid = std::fs::read_to_string(dir.path().join("R.valid.inter")).expect("read");
        bad[3][5] = 129;
        truncated_export(dir.path(), &bad, 4);
        write(dir.path(), "R.valid.inter", &valid);
        let error = Dataset::load(dir.path()).expect_err("disagreeing windows").to_string();
        assert!(error.contains("R.valid.inter:5: user 3 disagrees"), "{error}");
    }

    #[test]
    fn families_are_read_from_titles() {
        assert_eq!(Family::of_title("FIFA 19 - PlayStation 4"), Some(Family::Sony));
        assert_eq!(Family::of_title("Halo 5 - Xbox One"), Some(Family::Microsoft));
        assert_eq!(Family::of_title("Mario Kart - Nintendo 3DS"), Some(Family::Nintendo));
        assert_eq!(Family::of_title("The Sims 3 - PC"), Some(Family::Pc));
        assert_eq!(Family::of_title("HDMI Cable"), None);
    }

    #[test]
    fn partition_is_deterministic_and_covers_every_user_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        tiny(dir.path());
        let data = Dataset::load(dir.path()).expect("valid");
        let merchants = partition(&data, 1, 3);
        assert_eq!(merchants, partition(&data, 1, 3));
        let mut all: Vec<usize> = merchants.iter().flat_map(|m| m.users.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1]);
        // User 1's history names Sony twice: a Sony shop.
        assert!(merchants.iter().any(|m| m.family == Family::Sony && m.users == vec![1]));
    }
}
