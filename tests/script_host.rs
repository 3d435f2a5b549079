//! The Rhai host: tensor ops and autograd through scripts, the sandbox, and
//! the messages of script errors (file, line, column, call chain).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use lcasr::script::{compile, CompileOptions, SessionSetup};

/// Writes `files` (name, text) into a fresh folder and runs `main.rhai`
/// there with an operation limit; returns the error message, if any.
fn run_files(
    files: &[(&str, &str)],
    max_operations: u64,
) -> (tempfile::TempDir, Result<(), String>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let result = run_in(&dir.path().join("main.rhai"), max_operations, dir.path());
    (dir, result)
}

fn run_in(script: &Path, max_operations: u64, base: &Path) -> Result<(), String> {
    run_with_args(script, max_operations, base, &[])
}

/// `run_in` with script arguments (`--set name=value`).
fn run_with_args(
    script: &Path,
    max_operations: u64,
    base: &Path,
    args: &[(&str, &str)],
) -> Result<(), String> {
    let interrupts = Arc::new(AtomicUsize::new(0));
    let compiled = compile(
        script,
        &CompileOptions {
            import_roots: vec![],
            max_operations,
            interrupts: Arc::clone(&interrupts),
        },
    )
    .map_err(|f| f.message)?;
    compiled
        .run(SessionSetup {
            config: None,
            seed: 1,
            base_dir: PathBuf::from(base),
            run: None,
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            device: candle_core::Device::Cpu,
        })
        .map_err(|f| f.message)
}

fn run(text: &str) -> Result<(), String> {
    run_files(&[("main.rhai", text)], 1_000_000).1
}

fn error_of(text: &str) -> String {
    match run(text) {
        Ok(()) => panic!("script should fail:\n{text}"),
        Err(m) => m,
    }
}

fn assert_has(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "expected `{p}` in:\n{message}");
    }
    assert!(
        !message.contains("stack backtrace") && !message.contains("src/"),
        "no Rust internals in:\n{message}"
    );
}

#[test]
fn arithmetic_reductions_and_autograd_work_from_scripts() {
    run(r#"
        let a = tensor([[1.0, 2.0], [3.0, 4.0]]);
        let b = a * 2 + 1.0 - tensor([1.0, 1.0]);
        if b.shape != [2, 2] { throw `shape ${b.shape}`; }
        if (b.sum().item() - 20.0).abs() > 1e-6 { throw `sum ${b.sum().item()}`; }
        if (a.matmul(a).to_array()[0][1] - 10.0).abs() > 1e-6 { throw "matmul"; }
        let s = a.softmax(-1);
        if (s.sum(1).to_array()[0] - 1.0).abs() > 1e-6 { throw "softmax rows sum to one"; }
        if (a.log_softmax(1).exp().sum().item() - 2.0).abs() > 1e-5 { throw "log_softmax"; }
        if (1.0 / tensor([4.0])).item() != 0.25 { throw "float / tensor"; }
        if (2 - tensor([0.5])).item() != 1.5 { throw "int - tensor"; }
        if a[-1].to_array() != [3.0, 4.0] { throw "negative index"; }
        if a.reshape([-1]).shape != [4] { throw "reshape -1"; }
        if `${a}` != "Tensor[2, 2]" { throw `interpolation: ${a}`; }
    "#)
    .unwrap();
}

#[test]
fn gradients_of_a_script_loss_reach_model_parameters() {
    // A regulariser written in the script trains: d/dw sum(w^2) = 2w.
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
        let model = encoder(#{ n_layers: 1, d_model: 32, n_heads: 2, head_dim: 16 }, 15);
        let w = model.param("decoder.ff.weight");
        let loss = (w * w).sum();
        loss.backward();
        let g = w.grad();
        let want = w * 2.0;
        if ((g - want).abs().max(0).max(0).item()) > 1e-6 { throw "gradient of sum(w^2) is not 2w"; }
        // Gradients accumulate over backward calls.
        loss.backward();
        if ((w.grad() - want * 2.0).abs().max(0).max(0).item()) > 1e-6 { throw "no accumulation"; }
        let opt = optimizer(model, #{ name: "adam", args: #{ lr: 0.1 } });
        let before = w.detach() * 1.0;
        opt.step(0.1);
        if w.grad() != () { throw "step clears the gradients"; }
        if ((w - before).abs().sum().item()) == 0.0 { throw "the step changed nothing"; }
    "#;
    std::fs::write(dir.path().join("main.rhai"), script).unwrap();
    run_in(&dir.path().join("main.rhai"), 0, dir.path()).unwrap();
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let m = error_of("let x = 1;\nlet y = (x + ;\n");
    assert_has(&m, &["main.rhai:2:", "2 | let y = (x + ;", "^"]);
}

#[test]
fn unknown_function_is_named() {
    let m = error_of("let x = 1;\nlet y = frobnicate(x);\n");
    assert_has(
        &m,
        &["Function not found: frobnicate (i64)", "main.rhai:2:9"],
    );
}

#[test]
fn wrong_argument_type_is_reported() {
    let m = error_of("let t = zeros([2]);\nt.softmax(\"last\");\n");
    assert_has(
        &m,
        &["Function not found: softmax (Tensor, ", "main.rhai:2:3"],
    );
}

#[test]
fn shape_mismatch_points_at_the_operator() {
    let m = error_of("let a = zeros([2, 3]);\nlet b = zeros([4, 5]);\nlet c = a.matmul(b);\n");
    assert_has(
        &m,
        &[
            "matmul",
            "[2, 3]",
            "[4, 5]",
            "main.rhai:3:11",
            "3 | let c = a.matmul(b);",
        ],
    );
    let m = error_of("let a = zeros([2, 3]);\nlet c = a + zeros([4, 5]);\n");
    assert_has(&m, &["shape mismatch in broadcast_add", "main.rhai:2:11"]);
    let m = error_of("let t = tensor([1.0, [2.0]]);\n");
    assert_has(&m, &["ragged nested array", "main.rhai:1:"]);
}

#[test]
fn tensor_plus_string_is_an_error_not_a_string() {
    let m = error_of("let a = zeros([2]);\nlet s = a + \"x\";\n");
    assert_has(
        &m,
        &["cannot combine a tensor with a string", "main.rhai:2:"],
    );
}

#[test]
fn imports_cannot_escape_the_experiment_directory() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.rhai");
    std::fs::write(&secret, "fn f() { 1 }").unwrap();
    let (_d, r) = run_files(
        &[(
            "main.rhai",
            &format!("import \"{}\" as s;\n", secret.display()),
        )],
        0,
    );
    assert_has(&r.unwrap_err(), &["escapes the experiment directory"]);
    let (_d, r) = run_files(
        &[("main.rhai", "import \"../../../etc/passwd\" as s;\n")],
        0,
    );
    let m = r.unwrap_err();
    assert!(m.contains("escapes") || m.contains("cannot open"), "{m}");
    assert_has(&m, &["main.rhai"]);
}

#[test]
fn imports_inside_the_experiment_work_and_errors_show_the_chain() {
    let (_d, r) = run_files(
        &[
            ("main.rhai", "import \"lib/helpers\" as h;\nlet x = h::double(21);\nif x != 42 { throw \"bad\"; }\nh::broken();\n"),
            ("lib/helpers.rhai", "fn double(x) { x * 2 }\nfn broken() {\n    let t = zeros([2]);\n    t.matmul(zeros([3]))\n}\n"),
        ],
        0,
    );
    let m = r.unwrap_err();
    assert_has(
        &m,
        &[
            "helpers.rhai:4:",
            "in a call to function `broken`",
            "main.rhai:4:",
        ],
    );
}

#[test]
fn eval_is_disabled() {
    let m = error_of("let x = eval(\"1 + 1\");\n");
    assert_has(&m, &["eval", "disabled", "main.rhai:1:"]);
}

#[test]
fn endless_loop_hits_the_operation_limit() {
    let (_d, r) = run_files(&[("main.rhai", "let x = 0;\nloop { x += 1; }\n")], 10_000);
    assert_has(&r.unwrap_err(), &["too many operations", "main.rhai:2:"]);
}

#[test]
fn unknown_option_keys_are_named() {
    let m = error_of(
        "let t = zeros([1, 80, 8]);\nlet s = ctc_loss(t, [8], (), #{ reducton: \"sum\" });\n",
    );
    assert!(
        m.contains("Function not found") || m.contains("reducton"),
        "{m}"
    );
    let m = error_of(
        "let m = encoder(#{ n_layers: 1, d_model: 32, n_heads: 2, head_dim: 16 }, 10);\n\
         let o = optimizer(m, #{ name: \"adam\", args: #{ lr: 1e-3, betaz: 0.9 } });\n",
    );
    assert_has(&m, &["betaz", "main.rhai:2:"]);
}

#[test]
fn misspelt_model_key_is_reported() {
    let m = error_of("let m = encoder(#{ n_layer: 1 }, 10);\n");
    assert_has(
        &m,
        &[
            "unknown model key `n_layer` (did you mean `n_layers`?)",
            "main.rhai:1:",
        ],
    );
}

#[test]
fn reading_a_missing_map_property_is_an_error() {
    let m = error_of("let cfg = #{ lr: 1.0 };\nlet x = cfg.lrr;\n");
    assert_has(&m, &["lrr", "main.rhai:2:"]);
}

#[test]
fn thrown_errors_keep_their_message() {
    let m = error_of("fn check(x) {\n  if x > 1 { throw `value ${x} too large`; }\n}\ncheck(5);\n");
    assert_has(
        &m,
        &[
            "value 5 too large",
            "main.rhai:2:",
            "in a call to function `check`",
        ],
    );
}

#[test]
fn config_needs_a_run() {
    let m = error_of("let c = config();\n");
    assert_has(&m, &["no config", "main.rhai:1:"]);
}

#[test]
fn missing_script_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = run_in(&dir.path().join("nope.rhai"), 0, dir.path()).unwrap_err();
    assert_has(&m, &["cannot read script", "nope.rhai"]);
}

#[test]
fn script_arguments_are_typed_by_their_default_and_required_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let run_with = |text: &str, args: &[(&str, &str)]| {
        let script = dir.path().join("main.rhai");
        std::fs::write(&script, text).unwrap();
        run_with_args(&script, 0, dir.path(), args)
    };
    run_with(
        "if arg(\"n\", 3) != 7 { throw \"int\"; }\n\
         if arg(\"lr\", 0.5) != 0.25 { throw \"float\"; }\n\
         if arg(\"absent\", \"x\") != \"x\" { throw \"default\"; }\n\
         if arg(\"path\") != \"a/b\" { throw \"string\"; }\n",
        &[("n", "7"), ("lr", "0.25"), ("path", "a/b")],
    )
    .unwrap();
    let m = run_with("let n = arg(\"n\", 3);\n", &[("n", "seven")]).unwrap_err();
    assert_has(&m, &["argument `n`: `seven` is not an int", "main.rhai:1:"]);
    let m = run_with("let p = arg(\"model\");\n", &[]).unwrap_err();
    assert_has(&m, &["needs the argument `model`: pass --set model=VALUE"]);
}

#[test]
fn running_the_model_block_by_block_equals_forward() {
    run(r#"
        let model = encoder(#{ n_layers: 3, d_model: 32, n_heads: 2, head_dim: 16, self_conditioning: true }, 15);
        model.eval_mode();
        let x = randn([2, 80, 64]);
        let lengths = [64, 40];
        let out = model.forward(x, lengths, #{ interim_logits: true });
        if model.forward(x, lengths).interim.len() != 0 { throw "interim logits kept unasked"; }
        let h = model.subsample(x, lengths);
        if h.lengths != out.lengths { throw `lengths ${h.lengths} vs ${out.lengths}`; }
        let interim = [];
        for i in 0..model.n_layers {
            h = model.block(i, h);
            if i < model.n_layers - 1 {
                h = model.self_condition(h);
                interim.push(h.interim);
            }
        }
        let logits = model.head(h.x);
        if (logits - out.logits).abs().max(0).max(0).max(0).item() != 0.0 { throw "final logits differ"; }
        if (interim[1] - out.interim[1]).abs().max(0).max(0).max(0).item() != 0.0 { throw "interim logits differ"; }
        // A script can change the hidden states between blocks.
        let h2 = model.subsample(x, lengths);
        h2.x = h2.x * 0.0;
        if model.head(model.block(0, h2).x).shape != out.logits.shape { throw "shape"; }
    "#)
    .unwrap();
    let m = error_of(
        "let m = encoder(#{ n_layers: 1, d_model: 32, n_heads: 2, head_dim: 16 }, 10);\n\
         let h = m.subsample(zeros([1, 80, 32]), [32]);\nlet y = m.block(5, h);\n",
    );
    assert_has(
        &m,
        &[
            "block 5 does not exist: the model has 1 blocks",
            "main.rhai:3:",
        ],
    );
}

#[test]
fn loss_scaling_is_exact_and_an_overflow_skips_the_step_and_halves_the_scale() {
    // A power-of-two loss scale, undone before the step, leaves every weight
    // bit-identical; a scale that overflows skips the step and backs off.
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
        fn train(scale) {
            let model = encoder(#{ n_layers: 1, d_model: 32, n_heads: 2, head_dim: 16 }, 15, 5);
            let opt = optimizer(model, #{ name: "madgrad", args: #{ lr: 0.01 } });
            let x = ((arange(5120) * 0.37 - 900.0).tanh() * (arange(5120) * 0.011).tanh()).reshape([1, 80, 64]);
            let state = scale;
            for i in 0..3 {
                let out = model.forward(x, [64]);
                let loss = (out.logits * out.logits).mean();
                if state == () {
                    loss.backward();
                } else {
                    (loss * state.scale).backward();
                    opt.unscale_grads(state.scale);
                    state = update_loss_scale(state, opt.grads_finite());
                }
                opt.step(0.01);
            }
            #{ w: model.param("decoder.ff.weight"), state: state, skipped: opt.skipped }
        }
        let plain = train(());
        let scaled = train(loss_scale());
        if (plain.w - scaled.w).abs().max(0).max(0).item() != 0.0 {
            throw "loss scaling changed the weights";
        }
        if scaled.state.good_steps != 3 || scaled.state.scale != 65536.0 {
            throw `scale state ${scaled.state}`;
        }
        let huge = loss_scale();
        huge.scale = 1e300;
        let over = train(huge);
        if over.skipped != 3 { throw `overflowing steps taken: skipped ${over.skipped}`; }
        if over.state.scale != 1e300 / 8.0 { throw `no back-off: ${over.state.scale}`; }
    "#;
    std::fs::write(dir.path().join("main.rhai"), script).unwrap();
    run_in(&dir.path().join("main.rhai"), 0, dir.path()).unwrap();
}
