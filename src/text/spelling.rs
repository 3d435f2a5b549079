//! British to American spellings, word by word (reference §9.4 step 9).
//!
//! The reference uses a list of about 1,700 word pairs that cannot be shipped
//! here; this module generates a comparable map from word families plus a
//! hand list. Coverage:
//! - `-our` → `-or` for a list of stems, with their inflections and
//!   derivations (colour, coloured, colourful, favourite, behaviours, …);
//! - `-ise` → `-ize` for a list of verb stems, with -ises/-ised/-ising/
//!   -iser(s)/-isation(s)/-isable (organise, realisation, …), plus any word
//!   ending in `-isation(s)` except "improvisation";
//! - `-yse` → `-yze` (analyse, paralysed, catalysing, …);
//! - `-tre` → `-ter` (centre, theatres, metre, kilometre, fibre, centred, …);
//! - `-ence` → `-ense` (defence, offence, licence, pretence);
//! - doubled `l` before a suffix (travelled, cancelling, modeller, labelled,
//!   jewellery, marvellous, woollen, …) and single `l` in enrol/fulfil/
//!   instil/distil/skilful/wilful (→ enroll, fulfillment, …);
//! - `ae`/`oe` words (anaemia, paediatric, oestrogen, foetus, manoeuvre, …);
//! - a hand list of common others (grey, programme, tyre, cheque, aluminium,
//!   aeroplane, catalogue, analogue, plough, mould, draught, sceptic,
//!   pyjamas, judgement, ageing, artefact, cosy, yoghurt, practise, …).
//!
//! Words with both spellings in American use (e.g. "dialogue", "glamour",
//! "advertise", "exercise") are left alone.

use std::collections::HashMap;
use std::sync::OnceLock;

const OUR_STEMS: &[&str] = &[
    "arb",
    "ard",
    "arm",
    "behavi",
    "cand",
    "clam",
    "col",
    "demean",
    "endeav",
    "enam",
    "fav",
    "ferv",
    "flav",
    "harb",
    "hon",
    "hum",
    "lab",
    "misbehavi",
    "misdemean",
    "neighb",
    "od",
    "parl",
    "ranc",
    "rig",
    "rum",
    "sav",
    "savi",
    "splend",
    "succ",
    "tum",
    "val",
    "vap",
    "vig",
    "dishon",
];
const OUR_SUFFIXES: &[&str] = &[
    "", "s", "ed", "ing", "er", "ers", "ful", "fully", "less", "able", "ably", "ite", "ites",
    "ist", "ists", "hood", "hoods", "y", "ly", "al", "ism",
];
const ISE_STEMS: &[&str] = &[
    "agon",
    "antagon",
    "apolog",
    "author",
    "bapt",
    "capital",
    "categor",
    "central",
    "character",
    "civil",
    "colon",
    "commercial",
    "computer",
    "conceptual",
    "contextual",
    "critic",
    "criminal",
    "crystall",
    "democrat",
    "digit",
    "dramat",
    "econom",
    "emphas",
    "energ",
    "equal",
    "fantas",
    "familiar",
    "fertil",
    "final",
    "formal",
    "fossil",
    "general",
    "global",
    "harmon",
    "hospital",
    "hypothes",
    "ideal",
    "immun",
    "individual",
    "industrial",
    "initial",
    "internal",
    "item",
    "jeopard",
    "legal",
    "legitim",
    "liberal",
    "local",
    "magnet",
    "marginal",
    "maxim",
    "memor",
    "mesmer",
    "miniatur",
    "minim",
    "mobil",
    "modern",
    "monet",
    "monopol",
    "moral",
    "motor",
    "national",
    "natural",
    "neutral",
    "normal",
    "optim",
    "organ",
    "ostrac",
    "patron",
    "penal",
    "personal",
    "polar",
    "popular",
    "pressur",
    "priorit",
    "privat",
    "public",
    "radical",
    "rational",
    "real",
    "recogn",
    "reorgan",
    "revolution",
    "sanit",
    "satir",
    "scandal",
    "scrutin",
    "sensit",
    "sermon",
    "social",
    "special",
    "stabil",
    "standard",
    "steril",
    "stigmat",
    "subsid",
    "summar",
    "symbol",
    "sympath",
    "synchron",
    "synthes",
    "terror",
    "theor",
    "trivial",
    "tyrann",
    "urban",
    "util",
    "vandal",
    "vapor",
    "victim",
    "visual",
    "vocal",
    "western",
    "woman",
    "custom",
    "amort",
    "decentral",
    "desensit",
    "destabil",
    "disorgan",
    "international",
    "mechan",
    "metabol",
    "politic",
    "random",
    "regular",
    "unrecogn",
];
const ISE_SUFFIXES: &[(&str, &str)] = &[
    ("ise", "ize"),
    ("ises", "izes"),
    ("ised", "ized"),
    ("ising", "izing"),
    ("iser", "izer"),
    ("isers", "izers"),
    ("isation", "ization"),
    ("isations", "izations"),
    ("isable", "izable"),
];
const YSE_STEMS: &[&str] = &[
    "anal",
    "paral",
    "catal",
    "breathal",
    "dial",
    "electrol",
    "hydrol",
    "psychoanal",
];
const TRE_STEMS: &[&str] = &[
    "cen", "thea", "me", "li", "fi", "cali", "som", "spec", "mea", "lus", "sa", "scep", "mi",
    "och", "reconnoi", "goi", "lacklus", "kilome", "centime", "millime", "nanome", "decime",
    "epicen",
];
const LL_STEMS: &[&str] = &[
    "travel", "cancel", "model", "label", "level", "fuel", "counsel", "signal", "channel",
    "tunnel", "marvel", "quarrel", "rival", "shovel", "snorkel", "total", "towel", "unravel",
    "dial", "duel", "enamel", "equal", "funnel", "grovel", "jewel", "kennel", "libel", "panel",
    "pedal", "pencil", "refuel", "revel", "spiral", "stencil", "swivel", "cudgel", "bevel",
    "gravel", "marshal", "initial", "yodel", "chisel", "shrivel", "squirrel", "tinsel", "trammel",
    "barrel", "easel",
];
const LL_SUFFIXES: &[&str] = &["ed", "ing", "er", "ers", "ist", "ists"];

const HAND: &[(&str, &str)] = &[
    ("aeroplane", "airplane"),
    ("aeroplanes", "airplanes"),
    ("aluminium", "aluminum"),
    ("analogue", "analog"),
    ("analogues", "analogs"),
    ("catalogue", "catalog"),
    ("catalogues", "catalogs"),
    ("catalogued", "cataloged"),
    ("cataloguing", "cataloging"),
    ("cheque", "check"),
    ("cheques", "checks"),
    ("chequebook", "checkbook"),
    ("grey", "gray"),
    ("greys", "grays"),
    ("greyer", "grayer"),
    ("greyest", "grayest"),
    ("greyish", "grayish"),
    ("programme", "program"),
    ("programmes", "programs"),
    ("tyre", "tire"),
    ("tyres", "tires"),
    ("kerb", "curb"),
    ("kerbs", "curbs"),
    ("mould", "mold"),
    ("moulds", "molds"),
    ("mouldy", "moldy"),
    ("moulded", "molded"),
    ("moulding", "molding"),
    ("moult", "molt"),
    ("smoulder", "smolder"),
    ("smouldering", "smoldering"),
    ("plough", "plow"),
    ("ploughs", "plows"),
    ("ploughed", "plowed"),
    ("ploughing", "plowing"),
    ("sceptic", "skeptic"),
    ("sceptics", "skeptics"),
    ("sceptical", "skeptical"),
    ("scepticism", "skepticism"),
    ("draught", "draft"),
    ("draughts", "drafts"),
    ("draughty", "drafty"),
    ("gaol", "jail"),
    ("gaols", "jails"),
    ("pyjamas", "pajamas"),
    ("pyjama", "pajama"),
    ("judgement", "judgment"),
    ("judgements", "judgments"),
    ("acknowledgement", "acknowledgment"),
    ("acknowledgements", "acknowledgments"),
    ("ageing", "aging"),
    ("artefact", "artifact"),
    ("artefacts", "artifacts"),
    ("cosy", "cozy"),
    ("cosier", "cozier"),
    ("yoghurt", "yogurt"),
    ("yoghurts", "yogurts"),
    ("practise", "practice"),
    ("practised", "practiced"),
    ("practises", "practices"),
    ("practising", "practicing"),
    ("defence", "defense"),
    ("defences", "defenses"),
    ("defenceless", "defenseless"),
    ("offence", "offense"),
    ("offences", "offenses"),
    ("licence", "license"),
    ("licences", "licenses"),
    ("pretence", "pretense"),
    ("pretences", "pretenses"),
    ("jewellery", "jewelry"),
    ("marvellous", "marvelous"),
    ("marvellously", "marvelously"),
    ("woollen", "woolen"),
    ("enrol", "enroll"),
    ("enrols", "enrolls"),
    ("enrolment", "enrollment"),
    ("enrolments", "enrollments"),
    ("fulfil", "fulfill"),
    ("fulfils", "fulfills"),
    ("fulfilment", "fulfillment"),
    ("instil", "instill"),
    ("instils", "instills"),
    ("distil", "distill"),
    ("distils", "distills"),
    ("skilful", "skillful"),
    ("skilfully", "skillfully"),
    ("wilful", "willful"),
    ("wilfully", "willfully"),
    ("anaemia", "anemia"),
    ("anaemic", "anemic"),
    ("anaesthetic", "anesthetic"),
    ("anaesthetics", "anesthetics"),
    ("anaesthetist", "anesthetist"),
    ("anaesthesia", "anesthesia"),
    ("paediatric", "pediatric"),
    ("paediatrics", "pediatrics"),
    ("paediatrician", "pediatrician"),
    ("orthopaedic", "orthopedic"),
    ("encyclopaedia", "encyclopedia"),
    ("encyclopaedias", "encyclopedias"),
    ("mediaeval", "medieval"),
    ("haemorrhage", "hemorrhage"),
    ("haemoglobin", "hemoglobin"),
    ("haemophilia", "hemophilia"),
    ("leukaemia", "leukemia"),
    ("diarrhoea", "diarrhea"),
    ("oesophagus", "esophagus"),
    ("oestrogen", "estrogen"),
    ("foetus", "fetus"),
    ("foetal", "fetal"),
    ("manoeuvre", "maneuver"),
    ("manoeuvres", "maneuvers"),
    ("manoeuvred", "maneuvered"),
    ("manoeuvring", "maneuvering"),
    ("manoeuvrable", "maneuverable"),
    ("speciality", "specialty"),
    ("specialities", "specialties"),
    ("sulphur", "sulfur"),
    ("sulphate", "sulfate"),
    ("sulphuric", "sulfuric"),
    ("moustache", "mustache"),
    ("moustaches", "mustaches"),
    ("omelette", "omelet"),
    ("omelettes", "omelets"),
    ("carburettor", "carburetor"),
    ("counsellor", "counselor"),
    ("counsellors", "counselors"),
];

fn build() -> HashMap<String, String> {
    let mut m: HashMap<String, String> = HashMap::new();
    for stem in OUR_STEMS {
        for sfx in OUR_SUFFIXES {
            m.insert(format!("{stem}our{sfx}"), format!("{stem}or{sfx}"));
        }
    }
    for stem in ISE_STEMS {
        for (gb, us) in ISE_SUFFIXES {
            m.insert(format!("{stem}{gb}"), format!("{stem}{us}"));
        }
    }
    for stem in YSE_STEMS {
        for (gb, us) in [
            ("yse", "yze"),
            ("ysed", "yzed"),
            ("ysing", "yzing"),
            ("yser", "yzer"),
            ("ysers", "yzers"),
        ] {
            m.insert(format!("{stem}{gb}"), format!("{stem}{us}"));
        }
        m.insert(format!("{stem}yses"), format!("{stem}yzes"));
    }
    for stem in TRE_STEMS {
        for (gb, us) in [
            ("tre", "ter"),
            ("tres", "ters"),
            ("tred", "tered"),
            ("tring", "tering"),
        ] {
            m.insert(format!("{stem}{gb}"), format!("{stem}{us}"));
        }
    }
    for stem in LL_STEMS {
        for sfx in LL_SUFFIXES {
            m.insert(format!("{stem}l{sfx}"), format!("{stem}{sfx}"));
        }
    }
    for (gb, us) in HAND {
        if gb != us {
            m.insert(gb.to_string(), us.to_string());
        }
    }
    m
}

/// The British → American map (built once).
pub fn spelling_map() -> &'static HashMap<String, String> {
    static MAP: OnceLock<HashMap<String, String>> = OnceLock::new();
    MAP.get_or_init(build)
}

/// The American spelling of one lowercase word (the word itself if unknown).
pub fn americanize(word: &str) -> std::borrow::Cow<'_, str> {
    if let Some(us) = spelling_map().get(word) {
        return us.clone().into();
    }
    for (gb, us) in [("isations", "izations"), ("isation", "ization")] {
        if let Some(stem) = word.strip_suffix(gb) {
            if !stem.is_empty() && stem != "improv" {
                return format!("{stem}{us}").into();
            }
        }
    }
    word.into()
}

/// Replace every whitespace-separated word by its American spelling; words
/// are rejoined with single spaces.
pub fn standardize_spellings(s: &str) -> String {
    s.split_whitespace()
        .map(americanize)
        .collect::<Vec<_>>()
        .join(" ")
}
