//! The loader and partitioner on the real Amazon Games data in ../shared.

use std::path::Path;

use guild_client::data::{Dataset, Family, partition};

pub fn amazon_games() -> Dataset {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/amazon-games");
    Dataset::load(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

#[test]
fn real_data_loads_with_the_documented_sizes_and_splits() {
    let data = amazon_games();
    assert_eq!(data.name, "Games-6k");
    assert_eq!(data.titles.len(), 16_859);
    assert_eq!(data.users.len(), 50_546);
    let train: usize = data.users.iter().map(|u| u.training_examples().count()).sum();
    assert!(train > 200_000, "{train} training examples");
    for user in &data.users {
        let valid = user.validation_example().expect("every user has a validation example");
        assert_eq!(valid.target, *user.history.last().expect("non-empty"));
        assert!(user.training_examples().all(|e| e.history.len() + 1 < user.history.len()));
    }
}

#[test]
fn merchants_split_users_by_platform_family_once_each() {
    let data = amazon_games();
    let merchants = partition(&data, 300, 0);
    let mut seen = vec![false; data.users.len()];
    for m in &merchants {
        for &u in &m.users {
            assert!(!seen[u], "user {u} in two merchants");
            seen[u] = true;
        }
        assert!(m.users.len() <= 300, "{} has {} users", m.name, m.users.len());
    }
    assert!(seen.iter().all(|&s| s), "every user belongs to a merchant");
    let per_family =
        |f: Family| merchants.iter().filter(|m| m.family == f).map(|m| m.users.len()).sum::<usize>();
    // The data README: roughly 17k / 13k / 12k / 6k / 1k users.
    let sony = per_family(Family::Sony);
    let microsoft = per_family(Family::Microsoft);
    let nintendo = per_family(Family::Nintendo);
    let pc = per_family(Family::Pc);
    assert!(sony > microsoft && microsoft > pc && nintendo > pc, "{sony} {microsoft} {nintendo} {pc}");
    assert!(merchants.len() > 150, "{} merchants", merchants.len());
    assert_eq!(partition(&data, 300, 0), merchants, "deterministic");
}
