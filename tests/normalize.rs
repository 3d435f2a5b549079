//! The English scoring normaliser (reference §9.4): one or more cases per rule.

use lcasr::text::normalize::normalize_english;
use lcasr::text::spelling::americanize;

fn check(cases: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for (input, expected) in cases {
        let got = normalize_english(input);
        if got != *expected {
            failures.push(format!("{input:?}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn lowercase_punctuation_and_whitespace() {
    check(&[
        ("Hello, World!", "hello world"),
        ("Hello   \t world\n", "hello world"),
        ("The end.", "the end"),
        ("the U.S.A. is big", "the u s a is big"),
        ("rock & roll; yes?", "rock roll yes"),
        ("", ""),
    ]);
}

#[test]
fn bracketed_spans_are_removed() {
    check(&[
        (
            "[NOISE] we went (inaudible) home <unk> today",
            "we went home today",
        ),
        ("this is a test (of brackets) [and more].", "this is a test"),
    ]);
}

#[test]
fn fillers_are_removed_as_whole_words() {
    check(&[
        ("Um, I uh think hmm so", "i think so"),
        ("mm mhm mmm okay", "okay"),
        ("summer umbrella", "summer umbrella"),
    ]);
}

#[test]
fn contractions_and_titles() {
    check(&[
        ("I won't go", "i will not go"),
        ("I can't do it", "i can not do it"),
        ("let's go", "let us go"),
        ("they're here", "they are here"),
        ("it's fine", "it is fine"),
        ("I'd like", "i would like"),
        ("we'll see", "we will see"),
        ("I've got it", "i have got it"),
        ("I'm done", "i am done"),
        ("don't", "do not"),
        ("she's been there", "she has been there"),
        ("he'd gone", "he had gone"),
        ("John 's car", "john is car"),
        (
            "I gotta go, I'm gonna leave",
            "i got to go i am going to leave",
        ),
        ("you wanna", "you want to"),
        ("I ain't", "i aint"),
        ("Mr. Smith and Mrs. Jones", "mister smith and missus jones"),
        ("Dr. Who", "doctor who"),
        ("St. Louis", "saint louis"),
        ("Lt. Col. Brown Jr.", "lieutenant colonel brown junior"),
    ]);
}

#[test]
fn digit_commas_and_periods() {
    check(&[
        ("1,000,000 people", "1000000 people"),
        ("3.14 is pi.", "3.14 is pi"),
    ]);
}

#[test]
fn diacritics_and_symbols() {
    check(&[
        ("café naïve résumé", "cafe naive resume"),
        ("Straße", "strasse"),
        ("Œuvre", "oeuvre"),
        ("the $ sign", "the sign"),
        ("$5 and 10%", "$5 and 10%"),
    ]);
}

#[test]
fn number_words() {
    check(&[
        ("one hundred and five", "105"),
        ("twenty one", "21"),
        ("nineteen ninety", "1990"),
        ("two thousand and twenty", "2020"),
        ("one two three", "123"),
        ("zero", "0"),
        ("oh my", "0 my"),
        ("a hundred people", "a 100 people"),
        ("ten thousand", "10000"),
        ("three million two hundred thousand", "3200000"),
        ("double seven", "77"),
        ("one", "one"),
        ("in 2019", "in 2019"),
        ("covid19", "covid 19"),
        ("one and two", "one and 2"),
    ]);
}

#[test]
fn decimals_ordinals_and_plurals() {
    check(&[
        ("two point five", "2.5"),
        // A lone digit 1 is written back as "one", even before a decimal point.
        ("one point five", "one.5"),
        ("one point five million", "1500000"),
        ("three and a half", "3.5"),
        ("the first time", "the 1st time"),
        ("twenty third", "23rd"),
        ("twelfth", "12th"),
        ("one hundredth", "100th"),
        ("the sixties", "the 60s"),
        ("the 1990s", "the 1990s"),
        ("1st place", "1st place"),
        ("hundreds of people", "100s of people"),
    ]);
}

#[test]
fn currency_percent_and_signs() {
    check(&[
        ("five percent", "5%"),
        ("five per cent", "5%"),
        ("twenty dollars", "$20"),
        ("two dollars and seven cents", "$2.07"),
        ("ten pounds", "£10"),
        ("minus five", "-5"),
        ("dollars", "dollars"),
    ]);
}

#[test]
fn british_to_american() {
    check(&[
        (
            "colour favourite organise centre travelled",
            "color favorite organize center traveled",
        ),
        (
            "grey programme analyse defence",
            "gray program analyze defense",
        ),
        ("the neighbours realised", "the neighbors realized"),
        ("globalisation", "globalization"),
        ("improvisation exercise", "improvisation exercise"),
    ]);
    assert_eq!(americanize("behaviour"), "behavior");
    assert_eq!(americanize("hour"), "hour");
    assert_eq!(americanize("four"), "four");
}
