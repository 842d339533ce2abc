// The three files of mutual TLS (--tls-cert, --tls-key, --tls-ca), read and checked
// before anything connects or listens: kj-tls would find a certificate that is not
// one, or a key of another certificate, only at the handshake, and say "no start
// line" or have the peer hang up, naming no file.
#pragma once

#include <expected>
#include <string>

namespace ulsp::core {

struct TlsFiles {
  std::string cert, key, ca;  // PEM, as read
};

// Reads the three (the key as a secret: ReadSecretFile) and checks that the
// certificate and the CA parse as PEM certificates, the key as a PEM private key
// that is the certificate's, and that the certificate is valid now. What is wrong,
// in a message that names the option and the file, else the files.
std::expected<TlsFiles, std::string> ReadTlsFiles(const std::string& cert_path, const std::string& key_path,
                                                  const std::string& ca_path);

}  // namespace ulsp::core
