import ArgumentParser
import Foundation
import PalisadeAgent
import PalisadeStore

/// `palisade store`: the operator's side of etcd's authentication. Run
/// with a configuration whose store user is etcd's root (or before
/// authentication is on, with none).
struct StoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "store", abstract: "Users and roles in the shared store (etcd).",
                                                    subcommands: [EnableAuth.self, GrantNode.self])

    struct EnableAuth: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "enable-auth", abstract: "Create etcd's root user and turn authentication on.")
        @OptionGroup var options: ConfigOption
        @Option(help: "A file holding the root password (0600).") var rootPasswordFile: String
        func run() throws {
            guard let sc = try options.load().store else { throw CLIError("the configuration has no 'store'") }
            let password = try String(contentsOfFile: rootPasswordFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            let etcd = try sc.makeStore()
            try runBlocking { try await etcd.enableAuthentication(rootPassword: password) }
            print("authentication enabled; use user root with that password for operator commands")
        }
    }

    struct GrantNode: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "grant-node",
            abstract: "Create node NAME's etcd user and role (read everything, write only its own keys); print its password.")
        @OptionGroup var options: ConfigOption
        @Option(help: "The node's name.") var node: String
        func run() throws {
            guard let sc = try options.load().store else { throw CLIError("the configuration has no 'store'") }
            guard !node.isEmpty, node.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                throw CLIError("--node: '\(node)' is not a node name (letters, digits, '-', '_', '.')")
            }
            var random = [UInt8](repeating: 0, count: 24)
            guard getentropy(&random, random.count) == 0 else { throw CLIError("no entropy") }
            let password = Data(random).base64EncodedString()
            let etcd = try sc.makeStore()
            try runBlocking { try await etcd.grantNode(node, prefix: sc.prefix, password: password) }
            FileHandle.standardError.write(Data("user palisade-node-\(node); put the password below in the node's store.passwordFile (mode 0600)\n".utf8))
            print(password)
        }
    }
}
