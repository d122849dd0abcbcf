import ArgumentParser
import Foundation
import PalisadeAgent
import PalisadeJWT

/// `palisade jwt exchange TOKEN`: the identity an edge token maps to under
/// the configured issuers, or why it is refused (what the L7 proxy will do).
struct JWTCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jwt", abstract: "Edge tokens (JWT) and the identities they map to.",
                                                    subcommands: [Exchange.self])

    struct Exchange: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Verify a bearer token and print the identity it maps to.")
        @OptionGroup var options: ConfigOption
        @Argument(help: "The JWT (without 'Bearer ').") var token: String

        func run() async throws {
            let config = try options.load()
            guard !config.jwtIssuers.isEmpty else { throw CLIError("no jwtIssuers in the configuration") }
            let mapper = try await JWTIdentityMapper(issuers: config.jwtIssuers)
            switch await mapper.identity(bearer: token) {
            case .success(let id): print(id)
            case .failure(let r):
                FileHandle.standardError.write(Data("refused: \(r)\n".utf8))
                throw ExitCode(1)
            }
        }
    }
}
