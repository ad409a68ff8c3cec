//! Compiles the TensorRT shim when the `tensorrt` feature is on. TensorRT
//! is needed here only for its headers: the shim dlopens the libraries at
//! run time, so nothing links against them.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "tensorrt")]
    if let Err(message) = shim::build() {
        // A build script's way to fail with a message.
        eprintln!("\nerror: nanodetd's `tensorrt` feature: {message}\n");
        std::process::exit(1);
    }
}

#[cfg(feature = "tensorrt")]
mod shim {
    use std::env;
    use std::path::{Path, PathBuf};

    /// The first of `candidates` that holds `file`.
    fn find(candidates: &[PathBuf], file: &str) -> Option<PathBuf> {
        candidates.iter().find(|d| d.join(file).is_file()).cloned()
    }

    fn env_path(name: &str) -> Option<PathBuf> {
        println!("cargo:rerun-if-env-changed={name}");
        env::var_os(name).map(PathBuf::from)
    }

    pub fn build() -> Result<(), String> {
        let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
        // JetPack and NVIDIA's x86 packages put the headers in the multiarch
        // include directory; tarball installs under TENSORRT_ROOT.
        let multiarch = format!("/usr/include/{target_arch}-linux-gnu");
        let mut tensorrt = Vec::new();
        if let Some(dir) = env_path("TENSORRT_INCLUDE") {
            tensorrt.push(dir);
        } else if let Some(root) = env_path("TENSORRT_ROOT") {
            tensorrt.push(root.join("include"));
        } else {
            tensorrt.extend(
                [
                    &multiarch,
                    "/usr/include",
                    "/usr/local/TensorRT/include",
                    "/opt/tensorrt/include",
                ]
                .map(PathBuf::from),
            );
        }
        let trt_include = find(&tensorrt, "NvInfer.h").ok_or_else(|| {
            format!(
                "NvInfer.h not found in {}; set TENSORRT_ROOT (the directory holding include/ and lib/) or TENSORRT_INCLUDE",
                show(&tensorrt)
            )
        })?;
        // Before TensorRT 11 the parser header may live apart (onnx-tensorrt).
        let mut parser = vec![trt_include.clone()];
        parser.extend(env_path("TENSORRT_PARSER_INCLUDE"));
        parser.reverse();
        let parser_include = find(&parser, "NvOnnxParser.h").ok_or_else(|| {
            format!(
                "NvOnnxParser.h not found in {}; install TensorRT's ONNX parser headers or set TENSORRT_PARSER_INCLUDE",
                show(&parser)
            )
        })?;

        let mut cuda = Vec::new();
        if let Some(dir) = env_path("CUDA_INCLUDE") {
            cuda.push(dir);
        } else if let Some(root) = env_path("CUDA_ROOT") {
            cuda.push(root.join("include"));
        } else {
            cuda.extend(
                [
                    "/usr/local/cuda/include",
                    multiarch.as_str(),
                    "/usr/include",
                ]
                .map(PathBuf::from),
            );
        }
        let cuda_include = find(&cuda, "cuda_runtime_api.h").ok_or_else(|| {
            format!(
                "cuda_runtime_api.h not found in {}; set CUDA_ROOT (e.g. /usr/local/cuda) or CUDA_INCLUDE",
                show(&cuda)
            )
        })?;

        // Where the shim looks for libnvinfer first, before the loader's path.
        if let Some(lib) =
            env_path("TENSORRT_LIB").or_else(|| env_path("TENSORRT_ROOT").map(|r| r.join("lib")))
        {
            println!(
                "cargo:rustc-env=NANODETD_TENSORRT_LIB_DIR={}",
                lib.display()
            );
        }

        let shim = Path::new("src/backend/tensorrt");
        for file in ["shim.cpp", "shim.h"] {
            println!("cargo:rerun-if-changed={}", shim.join(file).display());
        }
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file(shim.join("shim.cpp"))
            // -isystem: TensorRT's own headers are not ours to warn about;
            // the shim itself builds with -Werror in scripts/check-tensorrt.sh.
            .flag("-isystem")
            .flag(trt_include.display().to_string())
            .flag("-isystem")
            .flag(parser_include.display().to_string())
            .flag("-isystem")
            .flag(cuda_include.display().to_string())
            .warnings(true)
            .try_compile("nanodetd_trt_shim")
            .map_err(|e| e.to_string())?;
        // dlopen lives in libdl before glibc 2.34 (JetPack 5 has 2.31).
        println!("cargo:rustc-link-lib=dl");
        Ok(())
    }

    fn show(dirs: &[PathBuf]) -> String {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}
