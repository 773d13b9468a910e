//! User stories for the workload's stdio: stdin with and without `-i`, large output byte
//! for byte with stderr kept apart, and its throughput.

use super::{katalite_captured, rootfs, sha256_hex, Captured};

/// `katalite run --rootfs <busybox> OPTIONS -- COMMAND` with `stdin` piped in.
fn busybox_with_stdin(options: &[&str], command: &[&str], stdin: &[u8]) -> Captured {
    let busybox = rootfs("busybox");
    let mut args = vec!["run", "--rootfs", &busybox];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(command);
    katalite_captured(&args, Some(stdin.to_vec()))
}

fn describe(run: &Captured) -> String {
    format!(
        "status {:?}\n--- stdout ({} bytes)\n{}\n--- stderr\n{}",
        run.status,
        run.stdout.len(),
        String::from_utf8_lossy(&run.stdout[..run.stdout.len().min(2000)]),
        String::from_utf8_lossy(&run.stderr)
    )
}

#[test]
fn echo_data_into_cat_round_trips_with_i() {
    let run = busybox_with_stdin(&["-i"], &["cat"], b"data\n");
    assert_eq!(run.status, Some(0), "{}", describe(&run));
    assert_eq!(run.stdout, b"data\n", "{}", describe(&run));
}

#[test]
fn stdin_arrives_byte_exact_and_ends_with_eof() {
    // Every byte value, 2 MiB: more than the host queue and init's buffers hold at once.
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i * 7 + i / 256).to_le_bytes()[0])
        .collect();
    let run = busybox_with_stdin(&["-i"], &["sh", "-c", "sha256sum; echo eof"], &data);
    assert_eq!(run.status, Some(0), "{}", describe(&run));
    let expected = format!("{}  -\neof\n", sha256_hex(&data));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        expected,
        "{}",
        describe(&run)
    );
}

#[test]
fn without_i_the_workload_reads_no_stdin() {
    let run = busybox_with_stdin(&[], &["sh", "-c", "cat; echo end"], b"ignored\n");
    assert_eq!(run.status, Some(0), "{}", describe(&run));
    assert_eq!(run.stdout, b"end\n", "{}", describe(&run));
}

#[test]
fn ten_megabytes_of_stdout_arrive_byte_exact_with_stderr_apart() {
    const SIZE: usize = 10_000_000;
    let script = "head -c 10000000 /dev/urandom > /tmp/data && sha256sum /tmp/data >&2 \
                  && cat /tmp/data && echo done >&2";
    let busybox = rootfs("busybox");
    let run = katalite_captured(
        &["run", "--rootfs", &busybox, "--", "sh", "-c", script],
        None,
    );
    assert_eq!(run.status, Some(0), "{}", describe(&run));
    assert_eq!(run.stdout.len(), SIZE, "{}", describe(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    let expected = format!("{}  /tmp/data\ndone\n", sha256_hex(&run.stdout));
    assert_eq!(stderr, expected, "stdout does not match the guest's sha256");
    let seconds = run.output_span.as_secs_f64().max(1e-3);
    eprintln!(
        "throughput: {SIZE} bytes of stdout in {seconds:.3} s = {:.1} MB/s (run took {:.3} s)",
        SIZE as f64 / seconds / 1e6,
        run.elapsed.as_secs_f64()
    );
}
