import Foundation
import PackagePlugin

/// Compiles every `bpf/*.bpf.c` into an eBPF object that the target ships as
/// a resource. Every header under bpf/ is an input, so editing a shared
/// header rebuilds the objects.
@main
struct BPFCompiler: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) async throws -> [Command] {
        let bpfDir = context.package.directoryURL.appending(path: "bpf")
        let files = try FileManager.default.subpathsOfDirectory(atPath: bpfDir.path)
        let sources = files.filter { $0.hasSuffix(".bpf.c") && !$0.contains("/") }.sorted()
        let headers = files.filter { $0.hasSuffix(".h") }.map { bpfDir.appending(path: $0) }
        let clang = try context.tool(named: "clang").url
        #if arch(x86_64)
        let multiarch = "x86_64-linux-gnu"
        #elseif arch(arm64)
        let multiarch = "aarch64-linux-gnu"
        #else
        #error("unsupported architecture for the BPF build")
        #endif
        return sources.map { source in
            let name = String(source.dropLast(".bpf.c".count))
            let input = bpfDir.appending(path: source)
            let output = context.pluginWorkDirectoryURL.appending(path: "\(name).bpfobj")
            return .buildCommand(
                displayName: "Compiling eBPF \(source)",
                executable: clang,
                arguments: [
                    "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
                    "-I", bpfDir.appending(path: "include").path,
                    "-I", bpfDir.path,
                    "-I", "/usr/include/\(multiarch)",
                    "-c", input.path, "-o", output.path,
                ],
                inputFiles: [input] + headers,
                outputFiles: [output]
            )
        }
    }
}
